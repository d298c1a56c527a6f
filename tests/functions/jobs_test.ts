import assert from "node:assert/strict";
import process from "node:process";
import type postgres from "postgres";
import { app } from "../../supabase/functions/jobs/index.ts";
import { registerJobHandler } from "../../supabase/functions/jobs/handlers.ts";
import { MAX_RESULT_BYTES, runJobs } from "../../supabase/functions/jobs/worker.ts";
import { HttpError } from "../../shared/errors.ts";
import { resetEnv } from "../../shared/env.ts";
import type { Principal } from "../../shared/auth.ts";
import { withClaims } from "../../shared/db.ts";
import { jsonDepth, jsonTextDepth } from "../../shared/schemas.ts";
import {
  anonToken,
  call,
  createUser,
  dbTest,
  expectError,
  freshDatabase,
  serviceToken,
  useDatabase,
  userToken,
} from "../support/harness.ts";

const db = await freshDatabase();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let throwsCalls = 0;
registerJobHandler("test_ok", (job) => Promise.resolve({ doubled: Number(job.payload.n) * 2 }));
registerJobHandler("test_throws", () => {
  throwsCalls++;
  return Promise.reject(new Error(`boom ${throwsCalls}`));
});
registerJobHandler("test_hangs", () => new Promise(() => {}));
// records which jobs ran (the lost-answer test below)
const lostRuns: string[] = [];
registerJobHandler("test_lost", (job) => {
  lostRuns.push(job.job_name);
  return Promise.resolve();
});
registerJobHandler("test_slow", () => sleep(200).then(() => ({ slept: 200 })));
// test_waits finishes only once three test_counts jobs have run meanwhile
let counted = 0;
let release: () => void = () => {};
const released = new Promise<void>((r) => (release = r));
registerJobHandler("test_counts", () => {
  if (++counted === 3) release();
  return Promise.resolve();
});
registerJobHandler("test_waits", () => released.then(() => ({ waited: true })));
// counts how many times each job ran (two types: claims of a set of types)
const runs = new Map<string, number>();
const countRun = (job: { id: string }) => {
  runs.set(job.id, (runs.get(job.id) ?? 0) + 1);
  return Promise.resolve();
};
registerJobHandler("test_once", countRun);
registerJobHandler("test_once_b", countRun);
registerJobHandler("test_nul", () => Promise.resolve({ text: "a\u0000b" }));
registerJobHandler("test_breaks_worker", async () => {
  await db.sql`revoke execute on function public.settle_and_claim_jobs from service_role`;
});
registerJobHandler("test_bigint", () => Promise.resolve({ total: 10n } as Record<string, unknown>));
registerJobHandler("test_nul_error", () => Promise.reject(new Error("bad\u0000thing")));
// finishes 5 ms inside its 1 s timeout
registerJobHandler("test_just_in_time", () => sleep(995).then(() => ({ on_time: true })));
// runs until opened
let openGate: () => void = () => {};
const gate = new Promise<void>((r) => (openGate = r));
registerJobHandler("test_gate", () => gate.then(() => ({ opened: true })));
registerJobHandler("test_deep", () => {
  let deep: Record<string, unknown> = {};
  for (let i = 0; i < 20000; i++) deep = { deep };
  return Promise.resolve(deep);
});
registerJobHandler("test_huge", () => Promise.resolve({ text: "x".repeat(MAX_RESULT_BYTES) }));
// 990,000 bytes as JSON.stringify writes it, 1,170,000 as the database prints it
registerJobHandler(
  "test_spaced",
  () =>
    Promise.resolve(
      Object.fromEntries(Array.from({ length: 90000 }, (_, i) => [`b${10000 + i}`, 0])),
    ),
);
// odd things a handler may throw or return
registerJobHandler("test_odd_message", () => {
  const err = new Error("x");
  (err as { message: unknown }).message = { code: "card_declined" };
  return Promise.reject(err);
});
registerJobHandler("test_bare_throw", () => Promise.reject(Object.create(null)));
registerJobHandler(
  "test_plain_throw",
  () => Promise.reject({ code: "E42", message: "upstream said no" }),
);
registerJobHandler("test_date_result", () => Promise.resolve(new Date(0) as never));
// a value that reads differently each time: a third read throws
registerJobHandler("test_getter_result", () => {
  let reads = 0;
  return Promise.resolve({
    get v() {
      if (++reads >= 3) throw new Error("read too often");
      return reads;
    },
  });
});
// shallow as an object, 500 levels deep as its JSON
registerJobHandler("test_tojson_deep", () => {
  let deep: Record<string, unknown> = {};
  for (let i = 0; i < 500; i++) deep = { deep };
  return Promise.resolve({ v: { toJSON: () => deep } });
});
registerJobHandler("test_no_result", () => Promise.resolve());
// takes the isolate's only database slot for 600 ms as it returns (see the
// settlement test below)
let hog: Promise<unknown> = Promise.resolve();
registerJobHandler("test_hogs", () => {
  const service: Principal = { role: "service_role", claims: { role: "service_role" } };
  hog = withClaims(service, "hog", (tx) => tx`select pg_sleep(0.6)`);
  return Promise.resolve({ hogged: true });
});
// spends 5 ms of the process's CPU (as the worker counts it, whatever else
// runs on the machine)
const processCpuMs = () => {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
};
registerJobHandler("test_burns", () => {
  const until = processCpuMs() + 5;
  while (processCpuMs() < until) { /* busy */ }
  return Promise.resolve();
});
// test_settles_late: its job's row is locked by another transaction until
// the test lets go, so its settlement waits
let releaseLateSettle: () => void = () => {};
let lateSettleHeld: Promise<unknown> = Promise.resolve();
registerJobHandler("test_settles_late", async (job) => {
  let locked: () => void = () => {};
  const isLocked = new Promise<void>((r) => (locked = r));
  const released = new Promise<void>((r) => (releaseLateSettle = r));
  lateSettleHeld = db.sql.begin(async (tx) => {
    await tx`select from public.background_jobs where id = ${job.id} for update`;
    locked();
    await released;
  });
  await isLocked;
});
// quick jobs of three types, for claims of several types at once
const PICK_TYPES = ["test_pick_a", "test_pick_b", "test_pick_c"];
for (const type of PICK_TYPES) registerJobHandler(type, () => Promise.resolve({ type }));
registerJobHandler("test_cancelled", async (job) => {
  await db.sql`select public.cancel_job(${job.id})`;
});

const schedule = async (
  body: Record<string, unknown>,
  token?: string,
  headers?: Record<string, string>,
) => await call(app, "POST", "/jobs", { token: token ?? await serviceToken(), body, headers });
const run = async (body: Record<string, unknown>) =>
  await call(app, "POST", "/jobs/run", { token: await serviceToken(), body });
const job = async (id: string) =>
  (await db.sql`select * from public.background_jobs where id = ${id}`)[0];

// First, while the database holds no other jobs: a run of every type.
dbTest("due jobs of a type with no handler are reported by the run", async () => {
  await db.sql`select public.schedule_job(p_job_type := 'payment_processing',
    p_job_name := 'Process Payment', p_payload := '{"amount": 5000}'::jsonb)`;
  const ok = await schedule({ job_type: "test_ok", job_name: "OK", payload: { n: 1 } });
  const summary = await run({});
  assert.equal(summary.status, 200, JSON.stringify(summary.body));
  assert.deepEqual([summary.body.completed, summary.body.stopped], [1, "drained"]);
  assert.deepEqual(summary.body.unhandled, { payment_processing: 1 });
  assert.equal((await job(ok.body.job.id)).status, "completed");
  await db.sql`update public.background_jobs set status = 'cancelled'
               where job_type = 'payment_processing'`;
});

dbTest("a job keyed in the header and the body takes one key: a second is 400", async () => {
  // due long after this file has run: no run below meets it
  const body = {
    job_type: "test_ok",
    job_name: "Two keys",
    payload: {},
    run_at: "2031-01-01T00:00:00Z",
    idempotency_key: "two",
  };
  expectError(
    await schedule(body, undefined, { "idempotency-key": "one" }),
    400,
    "idempotency_key_mismatch",
  );
  expectError(
    await schedule(body, undefined, { "idempotency-key": "bad key with spaces" }),
    400,
    "invalid_idempotency_key",
  );
  const [{ n }] = await db.sql`select count(*)::int as n from public.background_jobs
                               where job_name = 'Two keys'`;
  assert.equal(n, 0);
  const same = await schedule(body, undefined, { "idempotency-key": "two" });
  assert.equal(same.status, 201, JSON.stringify(same.body));
  assert.equal((await job(same.body.job.id)).idempotency_key, "two");
  await db
    .sql`update public.background_jobs set status = 'cancelled' where id = ${same.body.job.id}`;
});

dbTest("schedule, run and read a job; Idempotency-Key schedules once", async () => {
  const headers = { "idempotency-key": "double-21" };
  const created = await schedule(
    { job_type: "test_ok", job_name: "Double", payload: { n: 21 } },
    undefined,
    headers,
  );
  assert.equal(created.status, 201, JSON.stringify(created.body));
  const again = await schedule(
    { job_type: "test_ok", job_name: "Double", payload: { n: 21 } },
    undefined,
    headers,
  );
  assert.equal(again.status, 200);
  assert.equal(again.headers.get("idempotent-replayed"), "true");
  assert.equal(again.body.job.id, created.body.job.id);
  expectError(
    await schedule(
      { job_type: "test_ok", job_name: "Double", payload: { n: 22 } },
      undefined,
      headers,
    ),
    409,
    "idempotency_key_conflict",
  );

  const summary = await run({ job_types: ["test_ok"] });
  assert.equal(summary.status, 200, JSON.stringify(summary.body));
  assert.equal(summary.body.completed, 1);
  assert.equal(summary.body.stopped, "drained");
  const got = await call(app, "GET", `/jobs/${created.body.job.id}`, {
    token: await serviceToken(),
  });
  assert.equal(got.body.job.status, "completed");
  assert.deepEqual(got.body.job.result, { doubled: 42 });
  assert.equal("lease_token" in got.body.job, false, "the lease token stays with the worker");
});

dbTest("a job that throws is retried with growing delays and ends failed", async () => {
  const res = await schedule({ job_type: "test_throws", job_name: "Flaky", max_attempts: 3 });
  const id = res.body.job.id;
  const delays: number[] = [];
  for (let attempt = 1; attempt <= 3; attempt++) {
    const summary = await run({ job_types: ["test_throws"] });
    assert.equal(summary.body.failed, 1, JSON.stringify(summary.body));
    const row = await job(id);
    assert.equal(row.attempts, attempt);
    assert.equal(row.last_error, `boom ${attempt}`);
    if (attempt < 3) {
      assert.equal(row.status, "pending");
      delays.push(row.visible_at.getTime() - row.updated_at.getTime());
      // nothing runs before the backoff is over
      assert.equal((await run({ job_types: ["test_throws"] })).body.claimed, 0);
      await db.sql`update public.background_jobs set visible_at = now() where id = ${id}`;
    } else {
      assert.equal(row.status, "failed");
    }
  }
  assert.ok(delays[0] >= 7000 && delays[0] <= 13000, `first delay ${delays[0]}`);
  assert.ok(delays[1] > delays[0] * 1.3, `delays grow: ${delays}`);
  assert.equal(throwsCalls, 3);
});

dbTest("a job that hangs is timed out", async () => {
  const res = await schedule({
    job_type: "test_hangs",
    job_name: "Hangs",
    timeout_seconds: 1,
    max_attempts: 1,
  });
  const started = performance.now();
  const summary = await run({ job_types: ["test_hangs"] });
  const elapsed = performance.now() - started;
  assert.equal(summary.body.timed_out, 1, JSON.stringify(summary.body));
  assert.ok(elapsed >= 1000 && elapsed < 3000, `took ${elapsed} ms`);
  const row = await job(res.body.job.id);
  assert.equal(row.status, "timeout");
  assert.match(row.last_error, /timed out/);
});

dbTest("a crashed worker's running job is timed out by the next run", async () => {
  const res = await schedule({
    job_type: "test_ok",
    job_name: "Orphan",
    payload: { n: 1 },
    max_attempts: 2,
  });
  await db.sql`select * from public.claim_jobs(array['test_ok'], 1, 'crashed')`;
  await db
    .sql`update public.background_jobs set visible_at = now() - interval '1 second' where id = ${res.body.job.id}`;
  await run({ job_types: ["test_ok"] });
  const row = await job(res.body.job.id);
  assert.equal(row.status, "pending", "retried after its timeout, with backoff");
  assert.equal(row.last_error, "timed out");
  assert.ok(row.visible_at.getTime() > Date.now() + 5000);
  // its backoff ends while later tests run, which must not find it due
  await db.sql`delete from public.background_jobs where id = ${res.body.job.id}`;
});

dbTest("the worker stops claiming when its budget is spent", async () => {
  for (let i = 0; i < 30; i++) await schedule({ job_type: "test_slow", job_name: `Slow ${i}` });
  const started = performance.now();
  const summary = await run({ job_types: ["test_slow"], budget_ms: 500, concurrency: 5 });
  const elapsed = performance.now() - started;
  assert.equal(summary.body.stopped, "budget");
  assert.ok(
    summary.body.completed >= 5 && summary.body.completed < 30,
    JSON.stringify(summary.body),
  );
  assert.ok(elapsed < 1500, `took ${elapsed} ms`);
  const [left] = await db.sql`select count(*)::int as n from public.background_jobs
                              where job_type = 'test_slow' and status = 'pending'`;
  assert.equal(left.n, 30 - summary.body.completed);
});

// The edge runtime ends a request after 2 s of CPU, however long its wall
// clock budget: a run of many quick jobs used to drain 19,624 of them in 2.7
// CPU seconds. The run stops claiming once the jobs in hand would spend the
// rest of its CPU budget: counting the spent CPU alone, the 20 slots' jobs
// in hand took it past the budget by up to 20 jobs' worth.
dbTest("the worker stops claiming when its CPU budget would be spent", async () => {
  await db
    .sql`select public.schedule_job('test_burns', 'Burns ' || i, '{}') from generate_series(1, 300) i`;
  Deno.env.set("JOBS_RUN_CPU_BUDGET_MS", "200");
  resetEnv();
  try {
    const summary = await run({ job_types: ["test_burns"], concurrency: 20 });
    assert.equal(summary.status, 200);
    assert.equal(summary.body.stopped, "budget");
    // at 5 ms of CPU a job, 40 would take all of the 200 ms
    assert.ok(
      summary.body.completed >= 1 && summary.body.completed <= 40,
      JSON.stringify(summary.body),
    );
    const [left] = await db.sql`select count(*)::int as n from public.background_jobs
                                where job_type = 'test_burns' and status = 'pending'`;
    assert.equal(left.n, 300 - summary.body.completed);
  } finally {
    Deno.env.delete("JOBS_RUN_CPU_BUDGET_MS");
    resetEnv();
    await db.sql`delete from public.background_jobs where job_type = 'test_burns'`;
  }
});

// A settlement the database could not take at once (503: no connection
// free, or none answering) is sent again until the job's lease would end:
// given up, the job ran again after its lease, though it had completed. The
// retries outlast the run's 300 ms budget, and a retry claims no next job
// then: it used to claim one with the budget's answer from before the
// retries, and could start it past the edge runtime's limit.
// A settlement sent at 142 s could take until the statement timeout (or
// DB_OPERATION_TIMEOUT_MS), past the edge runtime's 150 s: the run was cut
// off without an answer. Every call of a run now has only the run's time left.
dbTest(
  "a settlement still waiting at the run's end is cut off there, in the database too",
  async () => {
    const { id } = (await schedule({ job_type: "test_settles_late", job_name: "Late" })).body.job;
    const started = performance.now();
    await assert.rejects(
      runJobs({ role: "service_role", claims: { role: "service_role" } }, "late", {
        budgetMs: 200,
        concurrency: 1,
        jobTypes: ["test_settles_late"],
        workerId: "late",
        endMs: 1_000,
      }),
      (e: unknown) => e instanceof HttpError && e.status === 503,
    );
    const ms = performance.now() - started;
    assert.ok(ms < 1_500, `the run ended after ${ms.toFixed(0)} ms`);
    await new Promise((r) => setTimeout(r, 200));
    const [waiting] = await db.sql`select count(*)::int as n from pg_stat_activity
    where datname = current_database() and state = 'active'
      and query like '%settle_and_claim_jobs(%' and pid <> pg_backend_pid()`;
    assert.equal(waiting.n, 0, "the database gave the settlement up too");
    releaseLateSettle();
    await lateSettleHeld;
    // never settled: it waits out its lease, as after any lost worker
    assert.equal((await job(id)).status, "running");
    await db.sql`delete from public.background_jobs where id = ${id}`;
  },
);

dbTest("a settlement the database is too busy for is sent again", async () => {
  const scheduled = await schedule({ job_type: "test_hogs", job_name: "Hogs", priority: 5 });
  const after = await schedule({ job_type: "test_ok", job_name: "After", payload: { n: 1 } });
  Deno.env.set("DB_POOL_SIZE", "1");
  Deno.env.set("DB_ACQUIRE_TIMEOUT_MS", "100");
  resetEnv();
  try {
    const summary = await run({
      job_types: ["test_hogs", "test_ok"],
      concurrency: 1,
      budget_ms: 300,
    });
    assert.equal(summary.status, 200, JSON.stringify(summary.body));
    assert.deepEqual(
      [summary.body.claimed, summary.body.completed, summary.body.stopped],
      [1, 1, "budget"],
      JSON.stringify(summary.body),
    );
    assert.ok(summary.body.elapsed_ms > 300, "the settlement was retried past the budget");
    await hog;
  } finally {
    Deno.env.delete("DB_POOL_SIZE");
    Deno.env.delete("DB_ACQUIRE_TIMEOUT_MS");
    resetEnv();
  }
  const done = await job(scheduled.body.job.id);
  assert.equal(done.status, "completed");
  assert.deepEqual(done.result, { hogged: true });
  assert.equal(done.attempts, 1);
  const waiting = await job(after.body.job.id);
  assert.deepEqual([waiting.status, waiting.attempts], ["pending", 0]);
  await db.sql`delete from public.background_jobs where id = ${after.body.job.id}`;
});

/**
 * A proxy to the test database that, the first time a query containing
 * `marker` passes, lets the database run it and drops the connection before
 * its answer (`afterMs` later): a commit whose answer is lost.
 */
function answerDroppingProxy(marker: string, afterMs = 0): { url: string; close: () => void } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const target = new URL(db.url);
  const open = new Set<() => void>();
  let armed = true;
  (async () => {
    for await (const client of listener) {
      const server = await Deno.connect({ hostname: "127.0.0.1", port: Number(target.port) });
      let tripped = false;
      const drop = () => {
        open.delete(drop);
        for (const conn of [client, server]) {
          try {
            conn.close();
          } catch { /* closed already */ }
        }
      };
      open.add(drop);
      client.readable.pipeThrough(
        new TransformStream({
          transform(chunk, out) {
            if (armed && new TextDecoder().decode(chunk).includes(marker)) {
              armed = false;
              tripped = true;
            }
            out.enqueue(chunk);
          },
        }),
      ).pipeTo(server.writable).catch(() => {}).finally(drop);
      server.readable.pipeThrough(
        new TransformStream({
          async transform(chunk, out) {
            if (!tripped) return out.enqueue(chunk);
            await sleep(afterMs);
            drop();
          },
        }),
      ).pipeTo(client.writable).catch(() => {}).finally(drop);
    }
  })();
  const url = new URL(db.url);
  url.port = String((listener.addr as Deno.NetAddr).port);
  return {
    url: url.href,
    close: () => {
      listener.close();
      for (const drop of open) drop();
    },
  };
}

// A settle-and-claim that commits but whose answer is lost is sent again and
// finds its job settled (lease_lost). The job the first call claimed is held
// under the slot's name: the slot takes it up on a fresh lease, also once the
// retry is past the budget (it was claimed within it). It used to claim
// another instead (or nothing, past the budget), and the held job waited out
// its lease unrun and ended timed out, its one attempt spent. A job another
// run holds under a name built from the same correlation id is not touched:
// slot names were the caller's correlation id and a number.
for (const pastBudget of [false, true]) {
  dbTest(
    `a job claimed by a settlement whose answer was lost still runs${
      pastBudget ? ", past the budget too" : ""
    }`,
    async () => {
      lostRuns.length = 0;
      for (const name of ["A", "B", "C"]) {
        await schedule({ job_type: "test_lost", job_name: name, max_attempts: 1, priority: 5 });
      }
      const [foreign] = await db.sql`
        insert into public.background_jobs (job_type, job_name, status, attempts, lease_token,
                                            locked_by, locked_at, visible_at)
        values ('test_lost', 'Foreign', 'running', 1, gen_random_uuid(), 'jobs-run:shared/1',
                now(), now() + interval '1 minute')
        returning id, lease_token`;
      // past the budget: the answer is lost 600 ms into a run of 400
      const proxy = answerDroppingProxy("settle_and_claim_jobs", pastBudget ? 600 : 0);
      await useDatabase(proxy.url);
      try {
        const summary = await call(app, "POST", "/jobs/run", {
          token: await serviceToken(),
          headers: { "x-correlation-id": "shared" },
          body: { job_types: ["test_lost"], concurrency: 1, ...(pastBudget && { budget_ms: 400 }) },
        });
        assert.equal(summary.status, 200, JSON.stringify(summary.body));
        assert.deepEqual(
          [summary.body.claimed, summary.body.completed, summary.body.lease_lost],
          pastBudget ? [2, 1, 1] : [3, 2, 1],
          JSON.stringify(summary.body),
        );
      } finally {
        proxy.close();
        await useDatabase(db.url);
      }
      assert.deepEqual(lostRuns, pastBudget ? ["A", "B"] : ["A", "B", "C"]);
      const rows = await db
        .sql`select job_name, status, attempts, lease_token from public.background_jobs
                                where job_type = 'test_lost' order by job_name`;
      assert.deepEqual(rows.map((r) => [r.job_name, r.status, r.attempts]), [
        ["A", "completed", 1],
        ["B", "completed", 1],
        ["C", pastBudget ? "pending" : "completed", pastBudget ? 0 : 1],
        ["Foreign", "running", 1],
      ]);
      assert.equal(rows[3].lease_token, foreign.lease_token, "the other run's job keeps its lease");
      await db.sql`delete from public.background_jobs where job_type = 'test_lost'`;
    },
  );
}

// The same for a claim on its own (a slot's first, or one after a refused
// settlement): answered 503 after it committed, the job it took was left to
// wait out its lease, and ended timed out, never run.
dbTest("a job claimed by a claim whose answer was lost still runs", async () => {
  lostRuns.length = 0;
  for (const name of ["A", "B"]) {
    await schedule({ job_type: "test_lost", job_name: name, max_attempts: 1, priority: 5 });
  }
  const proxy = answerDroppingProxy("public.claim_jobs(");
  await useDatabase(proxy.url);
  try {
    const summary = await run({ job_types: ["test_lost"], concurrency: 1 });
    assert.equal(summary.status, 200, JSON.stringify(summary.body));
    assert.deepEqual(
      [summary.body.claimed, summary.body.completed],
      [2, 2],
      JSON.stringify(summary.body),
    );
  } finally {
    proxy.close();
    await useDatabase(db.url);
  }
  assert.deepEqual(lostRuns, ["A", "B"]);
  const rows = await db.sql`select job_name, status, attempts from public.background_jobs
                            where job_type = 'test_lost' order by job_name`;
  assert.deepEqual(rows.map((r) => [r.job_name, r.status, r.attempts]), [
    ["A", "completed", 1],
    ["B", "completed", 1],
  ]);
  await db.sql`delete from public.background_jobs where job_type = 'test_lost'`;
});

dbTest("a slow job holds up only its own slot", async () => {
  await schedule({ job_type: "test_waits", job_name: "Waits", priority: 10, timeout_seconds: 3 });
  for (let i = 0; i < 3; i++) await schedule({ job_type: "test_counts", job_name: `Count ${i}` });
  const summary = await run({ job_types: ["test_waits", "test_counts"], concurrency: 2 });
  assert.deepEqual(
    [summary.body.claimed, summary.body.completed, summary.body.timed_out, summary.body.stopped],
    [4, 4, 0, "drained"],
    JSON.stringify(summary.body),
  );
});

dbTest("a job cancelled while it runs loses its result; the worker goes on", async () => {
  const cancelled = await schedule({
    job_type: "test_cancelled",
    job_name: "Cancelled",
    priority: 5,
  });
  const next = await schedule({ job_type: "test_ok", job_name: "Next", payload: { n: 2 } });
  const summary = await run({ job_types: ["test_cancelled", "test_ok"], concurrency: 1 });
  assert.deepEqual(
    [summary.body.claimed, summary.body.lease_lost, summary.body.completed],
    [2, 1, 1],
    JSON.stringify(summary.body),
  );
  const row = await job(cancelled.body.job.id);
  assert.equal(row.status, "cancelled");
  assert.equal(row.result, null);
  assert.deepEqual((await job(next.body.job.id)).result, { doubled: 4 });
});

dbTest("two concurrent runs of 4 slots each run every job exactly once", async () => {
  await db.sql`select public.schedule_job('test_once', 'Once ' || i, jsonb_build_object('i', i))
               from generate_series(1, 400) i`;
  const [a, b] = await Promise.all([
    run({ job_types: ["test_once"], concurrency: 4 }),
    run({ job_types: ["test_once"], concurrency: 4 }),
  ]);
  assert.equal(a.body.completed + b.body.completed, 400, JSON.stringify([a.body, b.body]));
  assert.equal(a.body.lease_lost + b.body.lease_lost, 0);
  assert.equal(runs.size, 400);
  assert.deepEqual([...new Set(runs.values())], [1], "no job ran twice");
  const [left] = await db.sql`select count(*)::int as n from public.background_jobs
                              where job_type = 'test_once' and status <> 'completed'`;
  assert.equal(left.n, 0);
});

dbTest("two concurrent runs over two job types run every job exactly once", async () => {
  runs.clear();
  await db
    .sql`select public.schedule_job(case when i % 2 = 0 then 'test_once' else 'test_once_b' end,
                                          'Once ' || i, jsonb_build_object('i', i), p_priority := i % 3)
               from generate_series(1, 400) i`;
  const types = ["test_once", "test_once_b"];
  const [a, b] = await Promise.all([
    run({ job_types: types, concurrency: 4 }),
    run({ job_types: types, concurrency: 4 }),
  ]);
  assert.equal(a.body.completed + b.body.completed, 400, JSON.stringify([a.body, b.body]));
  assert.equal(a.body.lease_lost + b.body.lease_lost, 0);
  assert.equal(runs.size, 400);
  assert.deepEqual([...new Set(runs.values())], [1], "no job ran twice");
  const [left] = await db.sql`select count(*)::int as n from public.background_jobs
                              where job_type = any(${types}) and status <> 'completed'`;
  assert.equal(left.n, 0);
});

// A handler that ran to its end is not run again for a result that cannot
// be kept: the job completes without it, and last_error says why.
dbTest("a result the database refuses completes the job without it, once", async () => {
  const res = await schedule({ job_type: "test_nul", job_name: "NUL", max_attempts: 3 });
  Deno.env.set("LOG_LEVEL", "warn");
  resetEnv();
  const lines: string[] = [];
  const original = console.error;
  console.error = (line: string) => lines.push(line);
  let summary;
  try {
    summary = await run({ job_types: ["test_nul"] });
  } finally {
    console.error = original;
    Deno.env.set("LOG_LEVEL", "silent");
    resetEnv();
  }
  const warnings = lines.map((l) => JSON.parse(l)).filter((e) => e.msg === "job result not kept");
  assert.deepEqual(warnings.map((w) => [w.job_id, w.error]), [
    [res.body.job.id, "result not stored: invalid_input"],
  ]);
  assert.equal(summary.status, 200, JSON.stringify(summary.body));
  assert.deepEqual([summary.body.completed, summary.body.failed], [1, 0]);
  const row = await job(res.body.job.id);
  assert.deepEqual([row.status, row.attempts, row.result, row.last_error], [
    "completed",
    1,
    null,
    "result not stored: invalid_input",
  ]);
});

dbTest("a result too deep or too large to store completes the job without it, once", async () => {
  const deep = await schedule({ job_type: "test_deep", job_name: "Deep", max_attempts: 3 });
  const huge = await schedule({ job_type: "test_huge", job_name: "Huge", max_attempts: 3 });
  const summary = await run({ job_types: ["test_deep", "test_huge"] });
  assert.equal(summary.status, 200, JSON.stringify(summary.body));
  assert.deepEqual([summary.body.completed, summary.body.failed], [2, 0]);
  const [d, h] = await Promise.all([deep, huge].map((r) => job(r.body.job.id)));
  assert.deepEqual([d.status, d.attempts, d.result, h.status, h.attempts, h.result], [
    "completed",
    1,
    null,
    "completed",
    1,
    null,
  ]);
  assert.match(d.last_error, /nests deeper than 100 levels/);
  assert.match(h.last_error, /larger than 1048576 bytes/);
});

dbTest("a result the database measures as too large completes the job without it", async () => {
  const res = await schedule({ job_type: "test_spaced", job_name: "Spaced", max_attempts: 3 });
  const summary = await run({ job_types: ["test_spaced"] });
  assert.equal(summary.status, 200, JSON.stringify(summary.body));
  assert.equal(summary.body.completed, 1);
  const row = await job(res.body.job.id);
  assert.deepEqual([row.status, row.attempts, row.result], ["completed", 1, null]);
  assert.equal(row.last_error, "result not stored: payload_too_large");
});

Deno.test("jsonTextDepth reads from the text the depth of the value it holds", () => {
  const texts = [
    "{}",
    '{"a": [1, {"b": []}]}',
    '{"s": "}]{[\\"{[", "t": [[["\\\\"]]]}',
    '{"k{[": "\\u005b", "deep": [[[[{}]]]]}',
    '[1, "]", {"x": "\\\\\\"[["}]',
  ];
  for (const text of texts) assert.equal(jsonTextDepth(text), jsonDepth(JSON.parse(text)), text);
});

dbTest("a result is measured as the JSON text it is stored as", async () => {
  const getter = await schedule({ job_type: "test_getter_result", job_name: "Getter" });
  const toJson = await schedule({ job_type: "test_tojson_deep", job_name: "toJSON" });
  const ok = await schedule({ job_type: "test_ok", job_name: "OK", payload: { n: 3 } });
  const summary = await run({ job_types: ["test_getter_result", "test_tojson_deep", "test_ok"] });
  assert.equal(summary.status, 200, JSON.stringify(summary.body));
  assert.equal(summary.body.completed, 3);
  const [g, t, o] = await Promise.all([getter, toJson, ok].map((r) => job(r.body.job.id)));
  // what is stored is the text JSON.stringify made (the getter's second read,
  // after the depth check's), not a third read
  assert.deepEqual([g.status, g.result, g.last_error], ["completed", { v: 2 }, null]);
  assert.deepEqual([t.status, t.result, t.last_error], [
    "completed",
    null,
    "the handler's result nests deeper than 100 levels",
  ]);
  assert.deepEqual(o.result, { doubled: 6 });
});

dbTest("a result that is not JSON completes without it; an error with a NUL fails", async () => {
  const bigint = await schedule({ job_type: "test_bigint", job_name: "BigInt", max_attempts: 1 });
  const nul = await schedule({ job_type: "test_nul_error", job_name: "NUL", max_attempts: 1 });
  const ok = await schedule({ job_type: "test_ok", job_name: "OK", payload: { n: 2 } });
  const summary = await run({ job_types: ["test_bigint", "test_nul_error", "test_ok"] });
  assert.equal(summary.status, 200, JSON.stringify(summary.body));
  assert.deepEqual([summary.body.failed, summary.body.completed], [1, 2]);
  const [b, n, o] = await Promise.all([bigint, nul, ok].map((r) => job(r.body.job.id)));
  assert.deepEqual([b.status, b.result], ["completed", null]);
  assert.match(b.last_error, /^the handler's result is not JSON: .*BigInt/);
  assert.deepEqual([n.status, n.last_error], ["failed", "badthing"]);
  assert.deepEqual(o.result, { doubled: 4 });
});

dbTest(
  "whatever a handler throws or returns fails or settles its attempt, never the run",
  async () => {
    const types = [
      "test_odd_message",
      "test_bare_throw",
      "test_plain_throw",
      "test_date_result",
      "test_no_result",
    ];
    const ids: string[] = [];
    for (const job_type of types) {
      ids.push((await schedule({ job_type, job_name: job_type, max_attempts: 1 })).body.job.id);
    }
    const summary = await run({ job_types: types });
    assert.equal(summary.status, 200, JSON.stringify(summary.body));
    assert.deepEqual([summary.body.failed, summary.body.completed], [3, 2]);
    const rows = await db.sql`select job_type, status, last_error, result is null as no_result
                            from public.background_jobs where id = any(${ids}::bigint[])`;
    const by = Object.fromEntries(rows.map((r) => [r.job_type, r]));
    assert.deepEqual(
      [by.test_odd_message.status, by.test_odd_message.last_error],
      ["failed", '{"code":"card_declined"}'],
    );
    assert.deepEqual([by.test_bare_throw.status, by.test_bare_throw.last_error], [
      "failed",
      "error",
    ]);
    assert.equal(by.test_plain_throw.last_error, "upstream said no");
    assert.deepEqual(
      [by.test_date_result.status, by.test_date_result.last_error],
      ["completed", "the handler's result must be a JSON object"],
    );
    assert.deepEqual([by.test_no_result.status, by.test_no_result.no_result], ["completed", true]);
  },
);

dbTest("a job that ends just inside its timeout completes while other workers claim", async () => {
  const ids: string[] = [];
  for (let i = 0; i < 3; i++) {
    const res = await schedule({
      job_type: "test_just_in_time",
      job_name: `On time ${i}`,
      timeout_seconds: 1,
      max_attempts: 1,
    });
    ids.push(res.body.job.id);
  }
  // another worker's claims sweep expired leases all the while
  let running = true;
  const sweeper = (async () => {
    while (running) await db.sql`select count(*) from public.claim_jobs(array['test_none'], 1)`;
  })();
  const summary = await run({ job_types: ["test_just_in_time"], concurrency: 3 });
  running = false;
  await sweeper;
  assert.equal(summary.body.completed, 3, JSON.stringify(summary.body));
  assert.equal(summary.body.lease_lost, 0);
  const rows = await db.sql`select status from public.background_jobs where id = any(${ids})`;
  assert.deepEqual(rows.map((r) => r.status), ["completed", "completed", "completed"]);
});

dbTest(
  "a job cancelled while it runs and retried does not run again until its lease ends",
  async () => {
    const token = await serviceToken();
    const res = await schedule({ job_type: "test_gate", job_name: "Gate", timeout_seconds: 20 });
    const id = res.body.job.id;
    const first = run({ job_types: ["test_gate"], budget_ms: 100 });
    while ((await job(id)).status !== "running") await sleep(20);
    const lease = (await job(id)).visible_at.getTime();
    assert.equal((await call(app, "POST", `/jobs/${id}/cancel`, { token })).status, 200);
    const retried = await call(app, "POST", `/jobs/${id}/retry`, { token });
    assert.equal(retried.body.job.status, "pending");
    assert.equal(Date.parse(retried.body.job.visible_at), lease, "due when the old lease ends");
    assert.equal(
      (await run({ job_types: ["test_gate"] })).body.claimed,
      0,
      "not run twice at once",
    );
    openGate();
    assert.equal((await first).body.lease_lost, 1);
  },
);

dbTest("a slot that fails stops the run's claims; the others finish their jobs first", async () => {
  const slow = await schedule({ job_type: "test_slow", job_name: "Slow", priority: 10 });
  const breaks = await schedule({
    job_type: "test_breaks_worker",
    job_name: "Breaks",
    priority: 5,
  });
  const later = await schedule({ job_type: "test_ok", job_name: "Later", payload: { n: 1 } });
  try {
    const summary = await run({
      job_types: ["test_slow", "test_breaks_worker", "test_ok"],
      concurrency: 2,
    });
    assert.equal(summary.status, 403, JSON.stringify(summary.body));
  } finally {
    await db.sql`grant execute on function public.settle_and_claim_jobs to service_role`;
  }
  assert.equal((await job(slow.body.job.id)).status, "completed", "the other slot's job finished");
  assert.equal((await job(breaks.body.job.id)).status, "running", "left to its lease");
  assert.equal(
    (await job(later.body.job.id)).status,
    "pending",
    "nothing claimed after the failure",
  );
});

dbTest("cancel and retry-now", async () => {
  const token = await serviceToken();
  const res = await schedule({
    job_type: "test_ok",
    job_name: "Later",
    run_at: new Date(Date.now() + 3600_000).toISOString(),
  });
  const id = res.body.job.id;
  const cancelled = await call(app, "POST", `/jobs/${id}/cancel`, { token });
  assert.equal(cancelled.body.job.status, "cancelled");
  expectError(await call(app, "POST", `/jobs/${id}/cancel`, { token }), 409, "invalid_state");
  const retried = await call(app, "POST", `/jobs/${id}/retry`, { token });
  assert.equal(retried.body.job.status, "pending");
  assert.ok(Date.parse(retried.body.job.visible_at) <= Date.now() + 1000, "due now");
  expectError(await call(app, "POST", "/jobs/999999/cancel", { token }), 404, "job_not_found");
});

dbTest("users see and act on their own jobs only; anon nothing", async () => {
  const alice = await createUser(db);
  const bob = await createUser(db);
  const aliceToken = await userToken(alice);
  const bobToken = await userToken(bob);
  expectError(
    await schedule({ job_type: "test_ok", job_name: "Mine", payload: { n: 1 } }, aliceToken),
    403,
    "job_type_not_allowed",
  );
  await db.sql`insert into private.user_job_types (job_type) values ('test_ok')`;
  const res = await schedule(
    { job_type: "test_ok", job_name: "Mine", payload: { n: 1 } },
    aliceToken,
  );
  assert.equal(res.status, 201);
  assert.equal(res.body.job.user_id, alice);
  const id = res.body.job.id;
  assert.equal((await call(app, "GET", `/jobs/${id}`, { token: aliceToken })).status, 200);
  expectError(await call(app, "GET", `/jobs/${id}`, { token: bobToken }), 404);
  expectError(await call(app, "POST", `/jobs/${id}/cancel`, { token: bobToken }), 404);
  expectError(await call(app, "POST", `/jobs/${id}/retry`, { token: bobToken }), 404);
  expectError(await call(app, "POST", "/jobs/run", { token: aliceToken, body: {} }), 403);
  assert.equal((await call(app, "POST", `/jobs/${id}/cancel`, { token: aliceToken })).status, 200);
  const anon = await anonToken();
  expectError(
    await call(app, "POST", "/jobs", { token: anon, body: { job_type: "test_ok", job_name: "x" } }),
    401,
  );
  expectError(await call(app, "GET", `/jobs/${id}`, { token: anon }), 401);
  expectError(await call(app, "POST", "/jobs/run", { token: anon, body: {} }), 401);
});

dbTest("the worker's path is not a job id: GET /jobs/run is 405 with Allow", async () => {
  const res = await call(app, "GET", "/jobs/run", { token: await serviceToken() });
  expectError(res, 405, "method_not_allowed");
  assert.match(res.headers.get("allow") ?? "", /^POST\b/);
  // an id that is not a number is still bad input, not a method question
  expectError(await call(app, "GET", "/jobs/abc", { token: await serviceToken() }), 400);
});

dbTest("bad input gets 400 and schedules nothing", async () => {
  const [before] = await db.sql`select count(*)::int as n from public.background_jobs`;
  expectError(await schedule({ job_type: "test_ok", job_name: "x", payload: [1] }), 400);
  expectError(await schedule({ job_type: "test_ok", job_name: "x", priority: -1 }), 400);
  expectError(await schedule({ job_type: "Bad Type", job_name: "x" }), 400);
  expectError(await schedule({ job_type: "test_ok", job_name: "x", timeout_seconds: 600 }), 400);
  expectError(await call(app, "GET", "/jobs/abc", { token: await serviceToken() }), 400);
  // Postgres takes UTC offsets up to 15:59 and nests JSON only so deep
  expectError(
    await schedule({ job_type: "test_ok", job_name: "x", run_at: "2030-01-01T00:00:00+16:00" }),
    400,
    "invalid_request",
  );
  let deep: unknown = 1;
  for (let i = 0; i < 20_000; i++) deep = { a: deep };
  expectError(await schedule({ job_type: "test_ok", job_name: "x", payload: deep }), 400);
  const unknownType = expectError(await run({ job_types: ["test_ok", "no_such_type"] }), 400);
  assert.equal(unknownType.code, "unknown_job_type");
  const [after] = await db.sql`select count(*)::int as n from public.background_jobs`;
  assert.equal(after.n, before.n);
});

dbTest("a claim of several types leaves the jobs it does not take to other claims", async () => {
  // A claim of several types used to lock each type's first due job until it
  // committed, though it took one: a claim beside it found nothing, and a
  // worker slot stopped, while jobs were due.
  for (const type of PICK_TYPES) await schedule({ job_type: type, job_name: type });
  await db.sql.begin(async (held) => {
    const [taken] = await held`select job_type from public.claim_jobs(${PICK_TYPES}, 1, 'held')`;
    assert.equal(taken.job_type, "test_pick_a", "the longest-due job");
    const beside = await db.sql`select job_type from public.claim_jobs(${PICK_TYPES}, 1, 'beside')`;
    assert.deepEqual(beside.map((r) => r.job_type), ["test_pick_b"], "a claim beside it");
    const summary = await run({ job_types: PICK_TYPES, concurrency: 2 });
    assert.deepEqual(
      [summary.body.claimed, summary.body.completed, summary.body.stopped],
      [1, 1, "drained"],
      JSON.stringify(summary.body),
    );
  });
  const rows = await db.sql`select job_type, status, locked_by from public.background_jobs
                            where job_type = any(${PICK_TYPES}) order by job_type`;
  assert.deepEqual(rows.map((r) => [r.job_type, r.status, r.locked_by]), [
    ["test_pick_a", "running", "held"],
    ["test_pick_b", "running", "beside"],
    ["test_pick_c", "completed", null],
  ]);
});

dbTest("a claim of several types keeps the claim order past jobs another claim holds", async () => {
  await db.sql`delete from public.background_jobs where job_type = any(${PICK_TYPES})`;
  for (const name of ["a1", "a2", "a3"]) {
    await schedule({ job_type: "test_pick_a", job_name: name, priority: 5 });
  }
  await schedule({ job_type: "test_pick_b", job_name: "b1" });
  const names = (rows: { job_name: string }[]) => rows.map((r) => r.job_name);
  await db.sql.begin(async (held) => {
    assert.deepEqual(
      names(await held`select job_name from public.claim_jobs(${PICK_TYPES}, 1, 'held')`),
      ["a1"],
    );
    // a1 held: the next of its type still outranks b1
    await db.sql.begin(async (beside) => {
      assert.deepEqual(
        names(await beside`select job_name from public.claim_jobs(${PICK_TYPES}, 1, 'beside')`),
        ["a2"],
      );
      assert.deepEqual(
        names(await db.sql`select job_name from public.claim_jobs(${PICK_TYPES}, 2, 'third')`),
        ["a3", "b1"],
      );
    });
  });
});

/**
 * Adds 3,001 test_pick_a jobs at priority 5 and, while another transaction
 * holds all but the last, a3001, claims 2 jobs of `types` (within 5 s):
 * the names taken, sorted, and how long the claim took.
 */
async function claimBehindHeld(types: string[]): Promise<{ names: string[]; ms: number }> {
  await db.sql`insert into public.background_jobs (job_type, job_name, priority, due)
               select 'test_pick_a', 'a' || i, 5, true from generate_series(1, 3001) i`;
  await db.sql`analyze public.background_jobs`;
  return await db.sql.begin(async (held) => {
    await held`select from public.background_jobs where job_type = 'test_pick_a'
               and job_name <> 'a3001' for update`;
    const started = performance.now();
    const taken = await db.sql.begin(async (tx) => {
      await tx`set local statement_timeout = '5s'`;
      return await tx`select job_name from public.claim_jobs(${types}, 2, 'beside')`;
    });
    return {
      names: taken.map((r) => r.job_name as string).sort(),
      ms: performance.now() - started,
    };
  });
}

// A claim of several types locked its candidates one by one and read them
// all again after each one another claim held: behind 3,000 held jobs it
// spun for 21 s of CPU. It now tries them up to a horizon and reads further
// only when it came up short.
dbTest(
  "a claim of several types behind thousands of held jobs keeps its order and is quick",
  async () => {
    await db.sql`delete from public.background_jobs where job_type = any(${PICK_TYPES})`;
    await schedule({ job_type: "test_pick_b", job_name: "b1" });
    const { names, ms } = await claimBehindHeld(PICK_TYPES);
    // a3001 outranks b1 (priority 5), though 3,000 jobs of its type come first
    assert.deepEqual(names, ["a3001", "b1"]);
    assert.ok(ms < 1000, `the claim took ${ms.toFixed(0)} ms`);
    await db.sql`delete from public.background_jobs where job_type = any(${PICK_TYPES})`;
  },
);

// Each pass of such a claim read every lane's window again, widened for all
// lanes: behind 3,000 held jobs of one type, 100 other types of 3,000 jobs
// each took 1.6 s. Only the lanes where a candidate was held read further.
dbTest(
  "a claim of many types behind thousands of held jobs of one reads only that type further",
  async () => {
    await db.sql`delete from public.background_jobs where job_type = any(${PICK_TYPES})`;
    const bulk = Array.from({ length: 100 }, (_, i) => `test_bulk_${i}`);
    await db.sql`insert into public.background_jobs (job_type, job_name, due)
               select 'test_bulk_' || i % 100, 'bulk', true from generate_series(0, 99999) i`;
    const { names, ms } = await claimBehindHeld(["test_pick_a", ...bulk]);
    assert.deepEqual(names, ["a3001", "bulk"]);
    assert.ok(ms < 250, `the claim took ${ms.toFixed(0)} ms`);
    await db.sql`delete from public.background_jobs
               where job_type = any(${PICK_TYPES}) or job_type like 'test_bulk_%'`;
  },
);

// Jobs whose time came while no claim looked wait outside the claim index
// until one takes them. Claims marked them due first, each as many as its
// limit in every type it asked for, and held the marks locked until they
// committed: a claim of one job over three types locked a job of each, and
// the claims beside it found none while two waited. The same with one type,
// where a claim marked its best waiting job but took a better due one. A
// claim now locks only the jobs it takes.
dbTest("claims beside one that finds jobs past their time take the other jobs", async () => {
  await db.sql`delete from public.background_jobs where job_type = any(${PICK_TYPES})`;
  await db.sql`insert into public.background_jobs (job_type, job_name, run_at, visible_at)
               select t, t || '-late', now() - interval '1 minute', now() - interval '1 minute'
               from unnest(${PICK_TYPES}::text[]) t`;
  const names = (rows: readonly Record<string, unknown>[]) =>
    rows.map((r) => r.job_name as string).sort();
  const claim = (sql: postgres.Sql | postgres.TransactionSql, worker: string) =>
    sql`select job_name from public.claim_jobs(${PICK_TYPES}, 1, ${worker})`;
  await db.sql.begin(async (held) => {
    const first = names(
      await held`select job_name from public.claim_jobs(${PICK_TYPES}, 1, 'held')`,
    );
    const beside = await Promise.all([claim(db.sql, "b"), claim(db.sql, "c")]);
    assert.deepEqual(
      [...first, ...beside.flatMap((rows) => names(rows))].sort(),
      PICK_TYPES.map((t) => `${t}-late`),
    );
  });
  // one type: a due job above one past its time
  await db.sql`delete from public.background_jobs where job_type = any(${PICK_TYPES})`;
  await schedule({ job_type: "test_pick_a", job_name: "due", priority: 10 });
  await db.sql`insert into public.background_jobs (job_type, job_name, run_at, visible_at)
               values ('test_pick_a', 'late', now() - interval '1 minute', now() - interval '1 minute')`;
  await db.sql.begin(async (held) => {
    assert.deepEqual(
      names(await held`select job_name from public.claim_jobs(array['test_pick_a'], 1, 'held')`),
      ["due"],
    );
    assert.deepEqual(
      names(await db.sql`select job_name from public.claim_jobs(array['test_pick_a'], 1, 'b')`),
      ["late"],
    );
  });
  await db.sql`delete from public.background_jobs where job_type = any(${PICK_TYPES})`;
});
