// Benchmarks of the transactions domain, each beside its peer from the same run:
//
//   1. create_transaction called directly in SQL (a pgbench script) vs
//      `pgbench -N` (the stock simple-update transaction), same clients;
//   2. POST /functions/v1/transactions through the local API vs the same
//      call direct in SQL, 16 clients;
//   3. transfer_funds among 10 hot wallets vs among 10,000 wallets.
//
// Run: EASYMO_DB_PORT=<port> npm run bench -- bench/transactions.ts
// (BENCH_DATABASE_URL and PGBIN come from scripts/bench.sh).
//
// Shared machines are noisy, so each comparison alternates ours and the peer
// in ROUNDS slices of SLICE seconds (BENCH_ROUNDS, BENCH_SLICE) and compares
// the totals: both sides see the same background load.
import postgres from "postgres";
import { BENCH_DB as DB_URL, pgbench, pgbenchInit, report, startApi, timed } from "./lib.ts";

const CLIENTS = 16;
const ROUNDS = Number(Deno.env.get("BENCH_ROUNDS") ?? "4");
const SLICE = Number(Deno.env.get("BENCH_SLICE") ?? "5");
const CREATE_USERS = 1_000;
const HOT = 10;
const SPREAD = 10_000;

// Deterministic user ids, so pgbench scripts can name users by number.
const uuidSql = (n: string) => `('00000000-0000-4000-8000-' || lpad((${n})::text, 12, '0'))::uuid`;
const uuidOf = (n: number) => `00000000-0000-4000-8000-${String(n).padStart(12, "0")}`;

const sql = postgres(DB_URL, { max: 4, onnotice: () => {} });

/** Alternates two measurements ROUNDS times; returns their mean rates. */
async function interleaved(
  ours: () => Promise<number>,
  peer: () => Promise<number>,
): Promise<[number, number]> {
  let a = 0;
  let b = 0;
  for (let i = 0; i < ROUNDS; i++) {
    if (i % 2 === 0) {
      a += await ours();
      b += await peer();
    } else {
      b += await peer();
      a += await ours();
    }
  }
  return [a / ROUNDS, b / ROUNDS];
}

// --- setup -------------------------------------------------------------------
console.log(`setup: ${CREATE_USERS + HOT + SPREAD} users, funded wallets, pgbench tables`);
await sql.unsafe(`
  insert into auth.users (id, email, role, aud)
  select ${uuidSql("n")}, 'bench' || n || '@bench.local', 'authenticated', 'authenticated'
  from generate_series(1, ${CREATE_USERS + HOT + SPREAD}) n
  on conflict do nothing`);
// Every transfer wallet gets a large opening credit, completed through the state machine.
await sql.unsafe(`
  do $$
  declare v_id uuid;
  begin
    for n in ${CREATE_USERS + 1}..${CREATE_USERS + HOT + SPREAD} loop
      v_id := (public.create_transaction(${uuidSql("n")}, 'credit', 1000000000, 'RWF')).id;
      perform public.update_transaction_status(v_id, 'processing');
      perform public.update_transaction_status(v_id, 'completed');
    end loop;
  end $$`);
await sql`vacuum analyze`;
await pgbenchInit(4);
await sql`vacuum analyze pgbench_accounts`;

// --- 1. create_transaction in SQL vs pgbench -N ----------------------------------
const createScript = `
\\set u random(1, ${CREATE_USERS})
\\set k random(1, 9000000000000000000)
select id from public.create_transaction(p_user_id := ${uuidSql(":u")}, p_type := 'credit',
  p_amount := 100.00, p_currency := 'RWF', p_idempotency_key := 'bench-' || :k,
  p_correlation_id := 'bench');
`;
await pgbench(timed(CLIENTS, 3), createScript); // warm-up
const [createSql, pgbenchN] = await interleaved(
  () => pgbench(timed(CLIENTS, SLICE), createScript),
  () => pgbench(timed(CLIENTS, SLICE, ["-N"])),
);
report(`create_transaction, SQL, ${CLIENTS} clients`, "/s", createSql, "pgbench -N", pgbenchN, 0.8);

// --- 2. over HTTP vs direct SQL ------------------------------------------------
const api = await startApi({ DB_POOL_SIZE: String(CLIENTS) });
const base = `${api.url}/functions/v1/transactions`;
const token = api.serviceKey;

let httpRate = 0;
let directRate = 0;
try {
  let seq = 0;
  const errors = new Map<string, number>();
  const body = () => ({ n: 1 + (seq % CREATE_USERS), key: `b-${seq++}-${crypto.randomUUID()}` });
  // One closed loop per client for `seconds`; returns completed calls per second.
  const load = async (seconds: number, once: () => Promise<boolean>): Promise<number> => {
    let ok = 0;
    const deadline = performance.now() + seconds * 1000;
    const started = performance.now();
    await Promise.all(Array.from({ length: CLIENTS }, async () => {
      while (performance.now() < deadline) if (await once()) ok++;
    }));
    return ok / ((performance.now() - started) / 1000);
  };
  const viaHttp = async (): Promise<boolean> => {
    const { n, key } = body();
    const res = await fetch(base, {
      method: "POST",
      headers: {
        authorization: `Bearer ${token}`,
        "content-type": "application/json",
        "idempotency-key": key,
      },
      body: JSON.stringify({
        user_id: uuidOf(n),
        type: "credit",
        amount: "100.00",
        currency: "RWF",
      }),
    });
    await res.body?.cancel();
    if (res.status !== 201) {
      errors.set(`http ${res.status}`, (errors.get(`http ${res.status}`) ?? 0) + 1);
    }
    return res.status === 201;
  };
  // The peer: the raw SQL call the function wraps, from the same process,
  // over 16 connections of the same driver.
  const direct = postgres(DB_URL, { max: CLIENTS, prepare: false, onnotice: () => {} });
  const viaSql = async (): Promise<boolean> => {
    const { n, key } = body();
    try {
      await direct`select * from public.create_transaction(p_user_id := ${
        uuidOf(n)
      }, p_type := 'credit',
        p_amount := ${"100.00"}::numeric, p_currency := 'RWF', p_idempotency_key := ${key},
        p_correlation_id := ${key})`;
      return true;
    } catch (err) {
      const code = String((err as { code?: string }).code);
      errors.set(`sql ${code}`, (errors.get(`sql ${code}`) ?? 0) + 1);
      return false;
    }
  };
  try {
    await load(3, viaHttp); // warm-up
    await load(2, viaSql);
    [httpRate, directRate] = await interleaved(
      () => load(SLICE, viaHttp),
      () => load(SLICE, viaSql),
    );
  } finally {
    await direct.end();
  }
  if (errors.size > 0) console.log(`errors: ${JSON.stringify([...errors])}`);
} finally {
  await api.stop();
}
report(
  `create_transaction, HTTP vs SQL, ${CLIENTS} clients`,
  "/s",
  httpRate,
  "direct SQL (postgres.js)",
  directRate,
  0.6,
);
console.log(
  `(for reference: the pgbench-driven direct SQL rate above was ${createSql.toFixed(0)}/s)`,
);

// --- 3. transfers: 10 hot wallets vs 10,000 ---------------------------------------
const transferScript = (first: number, count: number) => `
\\set a random(0, ${count - 1})
\\set b (:a + random(1, ${count - 1})) % ${count}
\\set k random(1, 9000000000000000000)
select id from public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_user_id := ${uuidSql(`${first} + :b`)}, p_from_user_id := ${uuidSql(`${first} + :a`)},
  p_idempotency_key := 'bench-' || :k);
`;
const spreadScript = transferScript(CREATE_USERS + HOT + 1, SPREAD);
const hotScript = transferScript(CREATE_USERS + 1, HOT);
await pgbench(timed(CLIENTS, 3), spreadScript); // warm-up
for (const clients of [8, 16]) {
  const [hot, spread] = await interleaved(
    () => pgbench(timed(clients), hotScript),
    () => pgbench(timed(clients), spreadScript),
  );
  report(`transfers, 10 hot wallets, ${clients} clients`, "/s", hot, "10,000 wallets", spread, 0.7);
}

const [check] = await sql`
  select (select count(*) from (select currency from public.ledger_entries group by currency
                                 having sum(amount) <> 0) x)::int as unbalanced,
         (select count(*) from public.wallets where kind = 'user' and (held > balance or balance < 0))::int
           as negative`;
console.log(
  `ledger after the run: ${check.unbalanced} unbalanced currencies, ${check.negative} negative wallets`,
);
await sql.end();
