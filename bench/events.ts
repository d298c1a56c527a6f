// Event store:
//   append with expected version (public.append_event, each worker appending
//   to its own aggregate and passing the version it last wrote) against a
//   plain insert of the same columns into an unpartitioned table, same
//   concurrency, same run, each connection warmed up first (WARMUP); appends
//   per second, best of ROUNDS rounds (each
//   round's rates and the median of its paired ratios are printed too). The
//   order of the sides rotates from round to round, so noise on the machine
//   falls on each alike. "ours" runs as service_role, like the API; "plain"
//   runs as the postgres superuser. The target is judged on the call the
//   spec shows (`select public.append_event(...)`, the function in the select
//   list); the same call in the FROM clause, the form PostgREST and the
//   events function send, is measured beside it and costs a function scan
//   (a tuplestore for the one row) on top. A third side is a ceiling: a
//   function of append_event's signature that makes only the event's insert
//   (the version taken on trust, no stream row, no lock, no checks), called the
//   same way: what any append through a function into event_store could reach.
//   Where an append's time goes, in the database alone: microseconds per call
//   with each call its own statement (parsed and planned, as prepare: false
//   sends it) and its own transaction, in one backend, commits not flushed:
//   no client, network or fsync, so the figures hardly move between runs.
//   Beside append_event and the plain insert: a function with append_event's
//   signature that only makes the append's two writes, the ceiling function
//   above (the event's insert alone), one that does nothing (the cost of the
//   call itself), and an empty statement.
//   Reading a 1,000-event aggregate (public.get_aggregate_events) as the
//   service role and as its owner through RLS: p50 / p99 latency in ms,
//   against a plain indexed select from the unpartitioned table, by a C client
//   (pgbench; the 5 ms target is judged there), by postgres.js, and the whole
//   HTTP request through the events function.
import {
  closeAll,
  connections,
  percentile,
  pgbench,
  pgbenchLatencies,
  report,
  spread,
  startApi,
} from "./lib.ts";

const APPENDS = Number(Deno.env.get("BENCH_APPENDS") ?? 4000);
const WORKERS = Number(Deno.env.get("BENCH_CONCURRENCY") ?? 4);
const ROUNDS = Number(Deno.env.get("BENCH_ROUNDS") ?? 10);
const READS = Number(Deno.env.get("BENCH_READS") ?? 500);
// Aggregate ids unique to this run, so a rerun against the same database starts fresh streams.
const RUN = Date.now().toString(36);
const BIG = `big-${RUN}`;

const [admin] = await connections(1, "postgres");
await admin`create table if not exists public.bench_plain_events (
  id bigserial primary key,
  aggregate_type text not null,
  aggregate_id text not null,
  event_type text not null,
  version bigint not null,
  payload jsonb not null,
  metadata jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now())`;
await admin`create index if not exists bench_plain_events_aggregate_idx
              on public.bench_plain_events (aggregate_type, aggregate_id, version)`;

// append_event's signature and row type, for the comparison functions
const SIGNATURE = `(p_aggregate_id text, p_aggregate_type text, p_event_type text,
  p_payload jsonb, p_expected_version bigint default null, p_metadata jsonb default null,
  p_correlation_id text default null, p_causation_id text default null,
  p_user_id uuid default null) returns public.event_store
  language plpgsql security definer set search_path = ''`;
await admin.unsafe(`create or replace function public.bench_append_noop${SIGNATURE}
  as $$ begin return null; end $$`);
await admin.unsafe(`create or replace function public.bench_append_writes${SIGNATURE}
  as $$
  declare
    v_row public.event_store;
  begin
    with stream as (
      insert into public.event_streams as s (aggregate_type, aggregate_id, version)
      values (p_aggregate_type, p_aggregate_id, 1)
      on conflict (aggregate_type, aggregate_id) do update set version = s.version + 1
      returning s.version)
    insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload)
    select p_aggregate_type, p_aggregate_id, p_event_type, stream.version, p_payload from stream
    returning * into v_row;
    return v_row;
  end $$`);
await admin.unsafe(`create or replace function public.bench_append_insert_only${SIGNATURE}
  as $$
  declare
    v_row public.event_store;
  begin
    insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload)
    values (p_aggregate_type, p_aggregate_id, p_event_type, greatest(p_expected_version, 0) + 1,
            p_payload)
    returning * into v_row;
    return v_row;
  end $$`);

type Append = "ours" | "ours_from" | "plain" | "insert_only";

// Calls each worker makes before the clock starts, on an aggregate of its own:
// a new connection's first calls load the catalogue caches and compile and
// plan the function (about 12 ms against the plain insert's 3 ms), which the
// API's pool, keeping its connections while busy, pays once, not per 1,000
// appends.
const WARMUP = 10;

async function appendRate(round: number, kind: Append): Promise<number> {
  const sqls = await connections(WORKERS, kind === "plain" ? "postgres" : "service_role");
  // one call: worker w appends version `version` (1, 2, ...) to aggregate `id`
  const append = async (w: number, id: string, version: number) => {
    const sql = sqls[w];
    const payload = sql.json({ fare: 5000, w });
    const expected = version === 1 ? -1 : version - 1;
    if (kind === "plain") {
      await sql`insert into public.bench_plain_events (aggregate_type, aggregate_id, event_type, version, payload)
                values ('trip', ${id}, 'fare_changed', ${version}, ${payload})`;
    } else if (kind === "insert_only") {
      await sql`select public.bench_append_insert_only(${id}, 'trip', 'fare_changed', ${payload},
                  p_expected_version := ${version - 1})`;
    } else if (kind === "ours") {
      await sql`select public.append_event(${id}, 'trip', 'fare_changed', ${payload},
                  p_expected_version := ${expected})`;
    } else {
      await sql`select 1 from public.append_event(${id}, 'trip', 'fare_changed', ${payload},
                  p_expected_version := ${expected})`;
    }
  };
  const idOf = (w: number) => `bench-${RUN}-${kind}-${round}-${w}`;
  try {
    await Promise.all(sqls.map(async (_, w) => {
      for (let v = 1; v <= WARMUP; v++) await append(w, `${idOf(w)}-warm`, v);
    }));
    const versions = new Array(WORKERS).fill(0);
    const seconds = await spread(WORKERS, APPENDS, async (w) => {
      await append(w, idOf(w), ++versions[w]);
    });
    return APPENDS / seconds;
  } finally {
    await closeAll(sqls);
  }
}

async function latencies(read: () => Promise<unknown>): Promise<number[]> {
  for (let i = 0; i < 20; i++) await read();
  const samples: number[] = [];
  for (let i = 0; i < READS; i++) {
    const t = performance.now();
    await read();
    samples.push(performance.now() - t);
  }
  return samples;
}

console.log(
  `events: ${APPENDS} appends, ${WORKERS} workers, best of ${ROUNDS} rounds; ${READS} reads`,
);
const sides: Append[] = ["plain", "ours", "ours_from", "insert_only"];
const rates: Record<Append, number[]> = { plain: [], ours: [], ours_from: [], insert_only: [] };
for (let r = 0; r < ROUNDS; r++) {
  // round r starts with side r (mod 4): every side takes every place in turn
  for (let k = 0; k < sides.length; k++) {
    const kind = sides[(r + k) % sides.length];
    rates[kind][r] = await appendRate(r, kind);
  }
}
const best = Object.fromEntries(sides.map((s) => [s, Math.max(...rates[s])])) as Record<
  Append,
  number
>;
// The machine's speed drifts between rounds; a side's rate against the plain
// insert's in the same round (a few seconds apart) drifts less than the two
// best rates, which may come from different rounds. Printed beside, as a check.
for (const side of sides) {
  const ratios = rates[side].map((rate, r) => rate / rates.plain[r]);
  console.log(
    `  ${side.padEnd(11)} per round: ${rates[side].map((x) => x.toFixed(0)).join(" ")}` +
      (side === "plain"
        ? ""
        : ` | ratio to plain, median of rounds ${percentile(ratios, 50).toFixed(2)}`),
  );
}
report(
  "append with expected version, as the spec calls it",
  "appends/s",
  best.ours,
  "plain insert",
  best.plain,
  0.7,
);
report(
  "append with expected version, called in FROM (PostgREST's form)",
  "appends/s",
  best.ours_from,
  "plain insert",
  best.plain,
);
report(
  "ceiling: the event's insert alone in a function of append_event's signature",
  "appends/s",
  best.insert_only,
  "plain insert",
  best.plain,
);

// --- in the database alone --------------------------------------------------

/** Microseconds per call of `statement` (%1$s: a run-unique id, %2$s: 1, 2, ...), best of 3. */
async function inDatabase(statement: string, calls = 3000): Promise<number> {
  const [sql] = await connections(1, "postgres");
  try {
    await sql`set synchronous_commit = off`;
    // the claims an API request carries: append_event reads them to find its caller
    await sql`select set_config('request.jwt.claims', '{"role": "service_role"}', false)`;
    let best = Infinity;
    for (let round = 0; round < 3; round++) {
      const started = performance.now();
      await sql.unsafe(`do $do$
        declare
          v_run text := ${"$r$"}${RUN}-${round}${"$r$"};
        begin
          for i in 1..${calls} loop
            execute format($f$${statement}$f$, v_run, i);
            commit;
          end loop;
        end $do$`);
      best = Math.min(best, (performance.now() - started) * 1000 / calls);
    }
    return best;
  } finally {
    await sql.end();
  }
}

const callOf = (fn: string) =>
  `select public.${fn}('db-${fn}-%1$s', 'trip', 'fare_changed', '{"fare": 5000}',
     p_expected_version := %2$s - 1)`;
const inDb = {
  plain: await inDatabase(`insert into public.bench_plain_events
    (aggregate_type, aggregate_id, event_type, version, payload)
    values ('trip', 'db-plain-%1$s', 'fare_changed', %2$s, '{"fare": 5000}')`),
  ours: await inDatabase(callOf("append_event")),
  writes: await inDatabase(callOf("bench_append_writes")),
  insertOnly: await inDatabase(callOf("bench_append_insert_only")),
  noop: await inDatabase(callOf("bench_append_noop")),
  empty: await inDatabase(`select 1 where %2$s > 0 and '%1$s' <> ''`),
};
const us = (n: number) => `${n.toFixed(0)} us`;
console.log(
  `append in the database alone, per call: append_event ${us(inDb.ours)} | ` +
    `its two writes in a function of the same signature ${us(inDb.writes)} | ` +
    `the event's insert alone in one ${us(inDb.insertOnly)} | ` +
    `a no-op function of the same signature ${us(inDb.noop)} | empty statement ${
      us(inDb.empty)
    } | plain insert ${us(inDb.plain)}`,
);

// a 1,000-event aggregate owned by a user
const owner = crypto.randomUUID();
await admin`insert into auth.users (id, email, role, aud)
            values (${owner}, ${owner + "@bench.local"}, 'authenticated', 'authenticated')`;
const events = Array.from({ length: 1000 }, (_, i) => ({
  aggregate_type: "trip",
  aggregate_id: BIG,
  event_type: "tick",
  payload: { i },
  user_id: owner,
}));
const [service] = await connections(1);
await service`select count(*) from public.append_events(${service.json(events)})`;
await admin`insert into public.bench_plain_events (aggregate_type, aggregate_id, event_type, version, payload)
            select 'trip', ${BIG}, 'tick', g, jsonb_build_object('i', g) from generate_series(1, 1000) g`;
await admin`analyze`;
const [userSql] = await connections(1, "authenticated");
await userSql`select set_config('request.jwt.claims',
                ${JSON.stringify({ role: "authenticated", sub: owner })}, false)`;

const readOurs = await latencies(async () => {
  const rows = await service`select * from public.get_aggregate_events('trip', ${BIG})`;
  if (rows.length !== 1000) throw new Error(`read ${rows.length} events`);
});
const readUser = await latencies(async () => {
  const rows = await userSql`select * from public.get_aggregate_events('trip', ${BIG})`;
  if (rows.length !== 1000) throw new Error(`read ${rows.length} events as the owner`);
});
const readPlain = await latencies(async () => {
  await admin`select * from public.bench_plain_events
              where aggregate_type = 'trip' and aggregate_id = ${BIG} order by version`;
});
// the same reads without shipping 1,000 rows to the client: the database's share
const serverOurs = await latencies(async () => {
  await service`select count(*) from public.get_aggregate_events('trip', ${BIG})`;
});
const serverPlain = await latencies(async () => {
  await admin`select count(*) from (select * from public.bench_plain_events
              where aggregate_type = 'trip' and aggregate_id = ${BIG} order by version) e`;
});
// the whole request: GET /events/aggregates/trip/<id> through the events function
const api = await startApi();
const historyUrl = `${api.url}/functions/v1/events/aggregates/trip/${BIG}`;
const readHttp = await latencies(async () => {
  const res = await fetch(historyUrl, { headers: { authorization: `Bearer ${api.serviceKey}` } });
  const body = await res.json();
  if (body.events?.length !== 1000) throw new Error(`HTTP read ${res.status}`);
});
await api.stop();
// the same reads by a C client (pgbench: libpq takes in every row, nothing
// parses them), as the API's roles set by the session's options
const claimsOf = (claims: Record<string, string>) =>
  `-c role=${claims.role} -c request.jwt.claims=${JSON.stringify(claims)}`;
const readScript = `select * from public.get_aggregate_events('trip', '${BIG}');`;
const asService = claimsOf({ role: "service_role" });
const asOwner = claimsOf({ role: "authenticated", sub: owner });
// each role reads the whole aggregate through these settings (else it would read fast)
for (const options of [asService, asOwner]) {
  await pgbench(
    ["-n", "-t", "1"],
    `select 1 / (count(*) = 1000)::int from public.get_aggregate_events('trip', '${BIG}');`,
    undefined,
    options,
  );
}
const cOurs = await pgbenchLatencies(readScript, READS, asService);
const cUser = await pgbenchLatencies(readScript, READS, asOwner);
const cPlain = await pgbenchLatencies(
  `select * from public.bench_plain_events
   where aggregate_type = 'trip' and aggregate_id = '${BIG}' order by version;`,
  READS,
);
for (const p of [50, 99]) {
  for (const [who, samples] of [["service role", cOurs], ["owner via RLS", cUser]] as const) {
    report(
      `read 1,000-event aggregate p${p}, ${who}, C client (pgbench)`,
      "ms",
      percentile(samples, p),
      "plain select",
      percentile(cPlain, p),
    );
  }
  const plain = percentile(readPlain, p);
  report(
    `read 1,000-event aggregate p${p}, HTTP GET (service role, JSON parsed by the client)`,
    "ms",
    percentile(readHttp, p),
    "plain select",
    plain,
  );
  report(
    `read 1,000-event aggregate p${p}, service role`,
    "ms",
    percentile(readOurs, p),
    "plain select",
    plain,
  );
  report(
    `read 1,000-event aggregate p${p}, owner via RLS`,
    "ms",
    percentile(readUser, p),
    "plain select",
    plain,
  );
  report(
    `read 1,000-event aggregate p${p}, in the database (count over the read)`,
    "ms",
    percentile(serverOurs, p),
    "plain select",
    percentile(serverPlain, p),
  );
}
const p99 = Math.max(percentile(cOurs, 99), percentile(cUser, 99));
console.log(
  `read 1,000-event aggregate by a C client, p99 of the slower role ${p99.toFixed(3)} ms ` +
    `(target < 5 ms: ${p99 < 5 ? "met" : "MISSED"})`,
);
await closeAll([admin, service, userSql]);
