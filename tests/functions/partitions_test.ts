// Partition maintenance under concurrency: several runs at once, while
// writers keep inserting rows dated in months that have no partition yet.
import assert from "node:assert/strict";
import postgres from "postgres";
import {
  ADMIN_URL,
  dbTest,
  freshDatabase,
  serviceToken,
  startLocalApi,
} from "../support/harness.ts";
import { SCHEDULES } from "../../scripts/schedules.ts";
import { resetEnv } from "../../shared/env.ts";

const db = await freshDatabase();

/** Next UTC month: its partitions' suffix (YYYY_MM) and its first instant. */
async function nextMonth(): Promise<{ next: string; next_start: string }> {
  const [row] = await db.sql`
    select to_char(m, 'YYYY_MM') as next, (m at time zone 'UTC')::text as next_start
    from (select date_trunc('month', now() at time zone 'UTC') + interval '1 month' as m) n`;
  return { next: row.next, next_start: row.next_start };
}

dbTest("concurrent maintenance runs and writers lose nothing and fail nothing", async () => {
  const clients = Array.from({ length: 6 }, () => postgres(db.url, { max: 1, onnotice: () => {} }));
  try {
    const writers = clients.slice(0, 3).map(async (sql, w) => {
      for (let i = 0; i < 40; i++) {
        await sql`insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
                  values ('api', 'gauge', 'spread', ${
          w * 100 + i
        }, now() + make_interval(months => ${12 + (i % 8)}))`;
      }
    });
    const maintainers = clients.slice(3).map(async (sql) => {
      for (let i = 0; i < 4; i++) await sql`select * from public.maintain_partitions()`;
    });
    await Promise.all([...writers, ...maintainers]);
    await db.sql`select * from public.maintain_partitions()`;

    const [counts] = await db.sql`
      select (select count(*)::int from public.system_metrics where metric_name = 'spread') as total,
             (select count(*)::int from public.system_metrics_default) as in_default`;
    assert.equal(counts.total, 120);
    assert.equal(counts.in_default, 0);
    const parts = await db.sql`select count(*)::int as n from pg_inherits
                               where inhparent = 'public.system_metrics'::regclass`;
    assert.ok(parts[0].n >= 1 + 4 + 8, `only ${parts[0].n} partitions`);
  } finally {
    await Promise.all(clients.map((c) => c.end()));
  }
});

dbTest("maintenance gives way to a transaction that read the table and then writes", async () => {
  // A row in DEFAULT for a month without a partition: maintenance will move it
  // under ACCESS EXCLUSIVE on the parent, which the reader below holds shared,
  // and the reader then writes: it must go ahead, not deadlock.
  await db
    .sql`insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
               values ('api', 'gauge', 'later', 1, now() + interval '9 years')`;
  const reader = postgres(db.url, { max: 1, onnotice: () => {} });
  const maintainer = postgres(db.url, { max: 1, onnotice: () => {} });
  try {
    const [{ pid }] = await maintainer`select pg_backend_pid() as pid`;
    let waited = false;
    let hasRead: () => void = () => {};
    const read = new Promise<void>((r) => (hasRead = r));
    const write = reader.begin(async (tx) => {
      await tx`select count(*) from public.system_metrics`;
      hasRead();
      // write only once maintenance waits for this reader: the deadlock's shape
      waited = await waitsOnLock(pid);
      await tx`insert into public.system_metrics (service_name, metric_type, metric_name, value)
               values ('api', 'gauge', 'reader', 1)`;
    });
    await read;
    const actions = await maintainer`select * from public.maintain_partitions()`;
    await write; // the writer is not the one aborted
    assert.ok(waited, "maintenance waited for the reader (else there was no deadlock to avoid)");
    // maintenance waited for the reader's transaction to end, then moved the row
    assert.deepEqual(
      actions.map((a) => [a.table_name, a.action, Number(a.rows_moved)]),
      [["public.system_metrics", "created", 1]],
    );
    const [{ n }] = await db.sql`select count(*)::int as n from public.system_metrics
                                 where metric_name in ('later', 'reader')`;
    assert.equal(n, 2);
  } finally {
    await Promise.all([reader.end(), maintainer.end()]);
  }
});

// A run is one transaction, so what it locked on one table stays locked while
// it waits for others. A writer holding a later table (an inbound WhatsApp
// message) and queued behind the run's lock on an earlier one (its event)
// closes a cycle when the run reaches the later table; the deadlock check of
// the one waiting longer, the writer, fired first, and the writer was
// aborted. Here a reader keeps the run waiting on two tables in between.
dbTest("a writer queued behind a maintenance run is never its deadlock victim", async () => {
  const when = "now() + interval '21 years'"; // a month no other test uses
  await db.sql.unsafe(`
    insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload,
                                    created_at)
    values ('trip', 'far', 'x', 1, '{}', ${when});
    insert into public.system_audit_logs (actor_type, actor_identifier, action, created_at)
    values ('system', 'test', 'far', ${when});
    insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
    values ('api', 'gauge', 'far', 1, ${when});
    insert into public.whatsapp_inbound_messages (wamid, from_phone, message_type, payload,
                                                  sent_at, created_at)
    values ('wamid.far', '+250788000001', 'text', '{}', now(), ${when})`);
  const [reader, maintainer, writer] = Array.from(
    { length: 3 },
    () => postgres(db.url, { max: 1, onnotice: () => {} }),
  );
  try {
    const [{ pid }] = await maintainer`select pg_backend_pid() as pid`;
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let hasRead!: () => void;
    const read = new Promise<void>((r) => (hasRead = r));
    const reading = reader.begin(async (tx) => {
      await tx`select count(*) from public.system_audit_logs`;
      await tx`select count(*) from public.system_metrics`;
      hasRead();
      await released;
    });
    await read;
    const run = maintainer`select table_name, action from public.maintain_partitions()
                           where action <> 'secured'`.execute();
    // once the run has held event_store's lock for 250 ms, write the later table,
    // then the earlier: the writer's deadlock check then falls (before the fix)
    // while the run waits for the later table, 1,000-1,500 ms into the run
    const holds = await eventually(async () =>
      (await db.sql`select from pg_locks where pid = ${pid} and granted
                    and relation = 'public.event_store'::regclass
                    and mode = 'AccessExclusiveLock'`).length > 0
    );
    assert.ok(holds, "the run took event_store's lock");
    await new Promise((r) => setTimeout(r, 250));
    const wrote = await writer.begin(async (tx) => {
      await tx`insert into public.whatsapp_inbound_messages
                 (wamid, from_phone, message_type, payload, sent_at)
               values ('wamid.writer', '+250788000002', 'text', '{}', now())`;
      await tx`insert into public.event_store (aggregate_type, aggregate_id, event_type, version,
                                               payload)
               values ('trip', 'writer', 'x', 1, '{}')`;
    }).then(() => "committed", (e) => `${e.code} ${e.message}`);
    const actions = await run;
    release();
    await reading;
    assert.equal(wrote, "committed", "the writer was not aborted");
    assert.deepEqual(actions.map((a) => [a.table_name, a.action]), [
      ["public.event_store", "created"],
      ["public.system_audit_logs", "skipped"],
      ["public.system_metrics", "skipped"],
      ["public.whatsapp_inbound_messages", "skipped"],
    ]);
  } finally {
    await Promise.all([reader.end(), maintainer.end(), writer.end()]);
  }
});

/** Whether `check` comes true within about two seconds. */
async function eventually(check: () => Promise<boolean>): Promise<boolean> {
  for (let i = 0; i < 400; i++) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 5));
  }
  return false;
}

/** Whether backend `pid` comes to wait for a lock within about two seconds. */
function waitsOnLock(pid: number): Promise<boolean> {
  return eventually(async () => {
    const [s] = await db.sql`select wait_event_type from pg_stat_activity where pid = ${pid}`;
    return s?.wait_event_type === "Lock";
  });
}

type Read = (sql: postgres.Sql) => PromiseLike<readonly unknown[]>;

/**
 * `read` on `reader` once, then again while maintenance moves `partition`'s
 * month out of DEFAULT (committing only once the read waits for it): the same
 * rows both times.
 */
async function readRacingTheMove(reader: postgres.Sql, partition: string, read: Read) {
  const mover = postgres(db.url, { max: 1, onnotice: () => {} });
  try {
    const before = await read(reader);
    assert.ok(before.length >= 1, "found before the move");
    const [{ pid }] = await reader`select pg_backend_pid() as pid`;
    let raced = false;
    let hasMoved: () => void = () => {};
    const movedUncommitted = new Promise<void>((r) => (hasMoved = r));
    const move = mover.begin(async (tx) => {
      const actions = await tx`select * from public.maintain_partitions()`;
      assert.ok(
        actions.some((a) => a.partition_name === partition && Number(a.rows_moved) >= 1),
        JSON.stringify(actions),
      );
      hasMoved();
      raced = await waitsOnLock(pid);
    });
    await movedUncommitted;
    const during = await read(reader);
    await move;
    assert.ok(raced, "the read waited for the move (else it raced nothing)");
    assert.deepEqual(during, before, "found while it moved");
  } finally {
    await mover.end();
  }
}

/** A connection as `role` with these JWT claims, as the API's requests are. */
async function connectAs(role: string, claims: Record<string, unknown>) {
  const sql = postgres(db.url, { max: 1, onnotice: () => {} });
  await sql`select set_config('role', ${role}, false),
                   set_config('request.jwt.claims', ${JSON.stringify({ role, ...claims })}, false)`;
  return sql;
}

// A transaction dated in a month without a partition sits in DEFAULT until
// maintenance moves it. An idempotent replay of it that looked for it during
// the move came back empty (HTTP 200 with every field null).
dbTest(
  "an idempotent replay racing the move of its transaction out of DEFAULT finds it",
  async () => {
    const service = await connectAs("service_role", {});
    try {
      const [{ user }] = await db.sql`select tests.create_user() as user`;
      // the first call creates the transaction, the one racing the move replays it
      await readRacingTheMove(
        service,
        "transactions_2031_03",
        (sql) =>
          sql`select id, amount from public.create_transaction(${user}, 'credit', 7, 'RWF',
                'moving-key', p_created_at := '2031-03-15 10:00:00+00')`,
      );
    } finally {
      await service.end();
    }
  },
);

// The API's reads on a warm pooled connection, racing the move of what they
// read out of DEFAULT: each must find it. As stable functions they ran with
// the snapshot their calling statement took before waiting for the move, and
// planned against the new partition, where the moved row is not in that
// snapshot: GET /transactions/:id said 404 and a listing of the month came
// back empty.

const TRANSACTION_READS: [string, (id: string, month: string) => Read][] = [
  ["get_transaction", (id) => (sql) => sql`select id from public.get_transaction(${id})`],
  [
    "list_transactions over the month",
    (_, month) => (sql) =>
      sql`select id from public.list_transactions(p_from := ${month + "-01 00:00+00"},
                                                  p_to := ${month + "-28 00:00+00"})`,
  ],
  [
    "list_transaction_events",
    (id) => (sql) => sql`select id from public.list_transaction_events(${id})`,
  ],
];
for (const [i, [name, readOf]] of TRANSACTION_READS.entries()) {
  dbTest(
    `a user's ${name} racing the move of their transaction out of DEFAULT finds it`,
    async () => {
      const month = `2032-0${i + 1}`;
      const [{ user }] = await db.sql`select tests.create_user() as user`;
      const [{ id }] = await db.sql`select id from public.create_transaction(${user}, 'credit', 5,
                                    'RWF', p_created_at := ${month + "-15 10:00:00+00"})`;
      // its history's first event
      await db.sql`select public.update_transaction_status(${id}, 'processing')`;
      const reader = await connectAs("authenticated", { sub: user });
      try {
        await readRacingTheMove(
          reader,
          `transactions_${month.replace("-", "_")}`,
          readOf(id, month),
        );
      } finally {
        await reader.end();
      }
    },
  );
}

dbTest("metric stats over a month racing its move out of DEFAULT count its metrics", async () => {
  await db
    .sql`insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
               values ('api', 'gauge', 'raced', 1, '2032-05-15 10:00:00+00')`;
  const reader = await connectAs("service_role", {});
  try {
    await readRacingTheMove(
      reader,
      "system_metrics_2032_05",
      (sql) =>
        sql`select * from public.get_metric_stats('api', 'raced', '2032-05-01 00:00+00',
                                                '2032-05-28 00:00+00', 86400)`,
    );
  } finally {
    await reader.end();
  }
});

// Scheduled is not enough: the local cluster once refused the connection
// pg_cron opened for each run, and every run failed.
dbTest("pg_cron's jobs run in the stack's database", async () => {
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  try {
    const [{ since }] = await admin`select now() as since`;
    // the sequencer runs every minute: its next run, finished
    let run: { status: string; return_message: string } | undefined;
    for (let i = 0; i < 150 && !run; i++) {
      [run] = await admin`
        select d.status, d.return_message from cron.job_run_details d join cron.job j using (jobid)
        where j.jobname = 'sequence-events' and d.start_time >= ${since}
          and d.status in ('succeeded', 'failed')`;
      if (!run) await new Promise((r) => setTimeout(r, 500));
    }
    assert.ok(run, "sequence-events did not run within 75 s");
    assert.equal(run.status, "succeeded", run.return_message);
  } finally {
    await admin.end();
  }
});

dbTest(
  "the stack's database schedules maintenance with pg_cron, as the scheduler does",
  async () => {
    // The template has no pg_cron (it lives only in cron.database_name); the
    // stack's main database, migrated by the same CLI run, has the job. Its
    // cadence must be the one the local scheduler and the hosted cron use.
    const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
    try {
      // and the SQL jobs the local scheduler runs where pg_cron does not
      const inDatabase = SCHEDULES.filter((s) => "sql" in s || s.inDatabase);
      assert.ok(inDatabase.some((s) => s.name === "maintain-partitions"));
      assert.ok(inDatabase.some((s) => s.name === "sequence-events"));
      for (const s of inDatabase) {
        const jobs = await admin`select schedule, command from cron.job where jobname = ${s.name}`;
        assert.equal(jobs.length, 1, s.name);
        assert.equal(jobs[0].schedule, s.cron, s.name);
        if ("sql" in s) assert.equal(jobs[0].command, s.sql, s.name);
      }
      const [job] = await admin`select command from cron.job where jobname = 'maintain-partitions'`;
      assert.equal(job.command, "call private.run_partition_maintenance()");
    } finally {
      await admin.end();
    }
  },
);

// pg_cron's maintenance under a statement timeout (one set for the role or
// the database, as a hosted project may have) and with a month in DEFAULT too
// big to move within it. It ran the whole pass as one transaction: the
// cancel rolled back everything, the months ahead too. Now each step commits,
// so the cancel loses only the month it was moving.
dbTest("pg_cron's maintenance cancelled part-way keeps the steps before the cancel", async () => {
  // leftovers of other tests first, so that only this test's months wait
  await db.sql`select * from public.maintain_partitions()`;
  const { next, next_start } = await nextMonth();
  await db.sql.unsafe(`drop table public.system_metrics_${next}`);
  await db.sql`
    insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
    select 'api', 'gauge', 'cron-big', g, '2046-02-01 00:00+00'::timestamptz + make_interval(secs => g % 86400)
    from generate_series(1, 1000000) g
    union all
    select 'api', 'gauge', 'cron-next', 1, ${next_start}::timestamptz + interval '1 hour'
    union all
    select 'api', 'gauge', 'cron-small', 1, '2046-01-10 00:00+00'`;
  const cron = postgres(db.url, { max: 1, onnotice: () => {} });
  try {
    await cron`set statement_timeout = 2500`;
    await assert.rejects(
      cron.unsafe("call private.run_partition_maintenance()"),
      (err: { code?: string }) => err.code === "57014",
    );
  } finally {
    await cron.end();
  }
  const where = async (name: string) =>
    (await db.sql`select tableoid::regclass::text as part, count(*)::int as n
                  from public.system_metrics where metric_name = ${name} group by 1`)
      .map((r) => `${r.part}: ${r.n}`);
  assert.deepEqual(await where("cron-next"), [`system_metrics_${next}: 1`], "next month made");
  assert.deepEqual(await where("cron-small"), ["system_metrics_2046_01: 1"], "a month moved");
  assert.deepEqual(await where("cron-big"), ["system_metrics_default: 1000000"], "nothing lost");

  // without a timeout the next run moves the rest
  await db.sql.unsafe("call private.run_partition_maintenance()");
  assert.deepEqual(await where("cron-big"), ["system_metrics_2046_02: 1000000"]);
});

// The maintenance route, as the local scheduler calls it, under a short
// statement timeout and with more rows in DEFAULT than one statement moves
// within it. It ran the whole pass as one statement: cancelled (503), it
// rolled back everything, the months ahead too, so next month's rows went on
// piling up in DEFAULT. Now the months ahead are made first and committed,
// and the backlog moves a month at a time, each in its own transaction.
dbTest(
  "HTTP maintenance under a short statement timeout makes the months ahead and drains a big backlog",
  async () => {
    Deno.env.set("DB_STATEMENT_TIMEOUT_MS", "1500");
    resetEnv();
    const api = await startLocalApi();
    try {
      // next month's partitions missing, as if no run had made them yet
      const { next, next_start } = await nextMonth();
      await db.sql.unsafe(`drop table public.system_metrics_${next};
                         drop table public.system_audit_logs_${next}`);
      // 300,000 rows in DEFAULT: 1,000 of next month, the rest over 30 months far ahead
      await db.sql`
      insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
      select 'api', 'gauge', 'backlog', g,
             case when g <= 1000 then ${next_start}::timestamptz + make_interval(secs => g)
                  else '2040-01-01 00:00+00'::timestamptz + make_interval(months => g % 30)
                       + make_interval(secs => g % 86400) end
      from generate_series(1, 300000) g`;
      const count = async () =>
        (await db.sql`select count(*)::int as n, sum(value)::bigint as s from public.system_metrics
                    where metric_name = 'backlog'`)[0];
      const before = await count();
      const token = await serviceToken();
      const maintain = async (body: unknown) => {
        const res = await fetch(`${api.url}/functions/v1/observability/maintenance`, {
          method: "POST",
          headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
          body: JSON.stringify(body),
        });
        const answer = await res.json();
        assert.equal(res.status, 200, JSON.stringify(answer));
        return answer;
      };

      // a small budget: the first call moves what it can and says what remains
      const first = await maintain({ budget_ms: 100 });
      assert.equal(first.stopped, "budget");
      assert.ok(first.remaining.length > 0, "months remain for the next call");
      for (const r of first.remaining) {
        assert.equal(r.table_name, "public.system_metrics");
        assert.match(r.partition_name, /^system_metrics_204[0-2]_\d\d$/);
        assert.ok(r.rows > 0);
      }
      const made = (table: string) =>
        first.actions.find((a: { partition_name: string; action: string }) =>
          a.partition_name === `${table}_${next}` && a.action === "created"
        )?.rows_moved;
      assert.equal(made("system_audit_logs"), 0, "next month's audit partition was made");
      assert.equal(made("system_metrics"), 1000, "next month's metrics moved out of DEFAULT");
      const [{ attached }] = await db.sql`
      select count(*)::int as attached from pg_inherits
      where inhrelid in (${"public.system_metrics_" + next}::regclass,
                         ${"public.system_audit_logs_" + next}::regclass)`;
      assert.equal(attached, 2, "next month's partitions are attached");

      // the next calls drain the rest; no row is lost or doubled
      let last = first;
      for (let i = 0; i < 30 && last.stopped !== "drained"; i++) last = await maintain({});
      assert.equal(last.stopped, "drained");
      assert.deepEqual(last.remaining, []);
      assert.deepEqual(await count(), before);
      const [{ left }] = await db
        .sql`select count(*)::int as left from public.system_metrics_default`;
      assert.equal(left, 0);
    } finally {
      await api.close();
      Deno.env.delete("DB_STATEMENT_TIMEOUT_MS");
      resetEnv();
    }
  },
);

dbTest(
  "HTTP maintenance reports a month too big for the statement timeout and moves the rest",
  async () => {
    // 1 s: at 400 ms the small month's own move ran out too when the machine
    // was busy (1 CI run in 6)
    Deno.env.set("DB_STATEMENT_TIMEOUT_MS", "1000");
    resetEnv();
    const api = await startLocalApi();
    try {
      // Autovacuum would analyse the 600,000 new rows, and its lock would turn
      // the month's move into 'skipped' (lock_timeout) instead of the
      // statement timeout this test is about.
      await db.sql`alter table public.system_metrics_default set (autovacuum_enabled = false)`;
      // one month far too big to move within 1 s, and a small one after it
      await db.sql`
      insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
      select 'api', 'gauge', 'big', g, '2045-01-01 00:00+00'::timestamptz + make_interval(secs => g)
      from generate_series(1, 600000) g
      union all
      select 'api', 'gauge', 'small', 1, '2045-02-10 00:00+00'`;
      const res = await fetch(`${api.url}/functions/v1/observability/maintenance`, {
        method: "POST",
        headers: { authorization: `Bearer ${await serviceToken()}` },
      });
      const answer = await res.json();
      assert.equal(res.status, 200, JSON.stringify(answer));
      const of = (name: string) =>
        answer.actions.filter((a: { partition_name: string }) => a.partition_name === name)
          .map((a: { action: string; rows_moved: number }) => [a.action, a.rows_moved]);
      assert.deepEqual(of("system_metrics_2045_01"), [["failed", 0]]);
      assert.deepEqual(of("system_metrics_2045_02"), [["created", 1]]);
      assert.deepEqual(answer.remaining, [
        {
          table_name: "public.system_metrics",
          partition_name: "system_metrics_2045_01",
          rows: 600000,
        },
      ]);
      assert.equal(answer.stopped, "drained");
      // pg_cron's run, with no statement timeout, moves it whole
      const moved = await db.sql`select action, rows_moved::int from public.maintain_partitions()
                               where partition_name = 'system_metrics_2045_01'`;
      assert.deepEqual(moved.map((a) => [a.action, a.rows_moved]), [["created", 600000]]);
    } finally {
      await db.sql`alter table public.system_metrics_default reset (autovacuum_enabled)`;
      await api.close();
      Deno.env.delete("DB_STATEMENT_TIMEOUT_MS");
      resetEnv();
    }
  },
);
