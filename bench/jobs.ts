// Jobs: schedule + claim + complete throughput with a trivial handler, at the
// same concurrency, in the same database and run:
//   ours             public.schedule_job, then workers loop claim_jobs(limit 1) + complete_job,
//                    each call sent as the jobs worker sends it (one simple-protocol message)
//   pg-boss          send, then workers loop fetch(batchSize 1) + complete
//   graphile-worker  addJob, then its runner with the same concurrency (default settings:
//                    no local queue and no batched completion, i.e. without its batching)
// Figures: jobs per second over both phases, best of ROUNDS rounds.
import { Logger, makeWorkerUtils, run } from "graphile-worker";
import type postgres from "postgres";
import { BENCH_DB, closeAll, connections, drain, report, spread, startPgBoss } from "./lib.ts";

const JOBS = Number(Deno.env.get("BENCH_JOBS") ?? 2000);
const WORKERS = Number(Deno.env.get("BENCH_CONCURRENCY") ?? 4);
const ROUNDS = Number(Deno.env.get("BENCH_ROUNDS") ?? 2);

interface Rate {
  total: number;
  schedule: number;
  process: number;
}

const phases = (scheduled: number, processed: number): Rate => ({
  total: JOBS / (scheduled + processed),
  schedule: JOBS / scheduled,
  process: JOBS / processed,
});

const better = (a: Rate | undefined, b: Rate) => (a && a.total >= b.total ? a : b);

// Ours goes the way the jobs function's worker sends it (rpc in shared/db.ts):
// the request's settings and the call as one simple-protocol message, values
// as literals, one round trip per call.
const SETTINGS = `select set_config('role', 'service_role', true),
  set_config('request.jwt.claims', '{"role": "service_role"}', true)`;
const call = (sql: postgres.Sql, statement: string) => sql.unsafe(`${SETTINGS}; ${statement}`);

async function ours(): Promise<Rate> {
  const sqls = await connections(WORKERS);
  try {
    const scheduled = await spread(WORKERS, JOBS, async (w, i) => {
      await call(sqls[w], `select public.schedule_job('bench_noop', 'bench', '{"i": ${i}}')`);
    });
    const processed = await drain(WORKERS, async (w) => {
      const [, [job]] = await call(
        sqls[w],
        `select id, lease_token from public.claim_jobs(array['bench_noop'], 1, 'bench-${w}')`,
      ) as unknown as { id: string; lease_token: string }[][];
      if (!job) return 0;
      await call(
        sqls[w],
        `select public.complete_job(${job.id}, '${job.lease_token}', null)`,
      );
      return 1;
    });
    return phases(scheduled, processed);
  } finally {
    await closeAll(sqls);
  }
}

async function pgBoss(): Promise<Rate> {
  const boss = await startPgBoss(WORKERS);
  await boss.createQueue("bench_noop");
  try {
    const scheduled = await spread(WORKERS, JOBS, async (_, i) => {
      await boss.send("bench_noop", { i });
    });
    const processed = await drain(WORKERS, async () => {
      const [job] = await boss.fetch("bench_noop", { batchSize: 1 });
      if (!job) return 0;
      await boss.complete("bench_noop", job.id);
      return 1;
    });
    return phases(scheduled, processed);
  } finally {
    await boss.stop({ graceful: false, wait: true });
  }
}

async function graphileWorker(): Promise<Rate> {
  const logger = new Logger(() => () => {});
  const utils = await makeWorkerUtils({ connectionString: BENCH_DB, logger });
  await utils.migrate();
  let scheduled: number;
  try {
    scheduled = await spread(WORKERS, JOBS, async (_, i) => {
      await utils.addJob("bench_noop", { i });
    });
  } finally {
    await utils.release();
  }
  let done = 0;
  let finished: () => void = () => {};
  const allDone = new Promise<void>((resolve) => (finished = resolve));
  const started = performance.now();
  const runner = await run({
    connectionString: BENCH_DB,
    concurrency: WORKERS,
    maxPoolSize: WORKERS + 1,
    noHandleSignals: true,
    pollInterval: 100,
    logger,
    taskList: {
      bench_noop: () => {
        if (++done === JOBS) finished();
        return Promise.resolve();
      },
    },
  });
  await allDone;
  const processed = (performance.now() - started) / 1000;
  await runner.stop();
  return phases(scheduled, processed);
}

console.log(`jobs: ${JOBS} jobs, ${WORKERS} workers, best of ${ROUNDS} rounds`);
let best: { ours?: Rate; pgBoss?: Rate; graphile?: Rate } = {};
for (let r = 0; r < ROUNDS; r++) {
  best = {
    ours: better(best.ours, await ours()),
    pgBoss: better(best.pgBoss, await pgBoss()),
    graphile: better(best.graphile, await graphileWorker()),
  };
}
const { ours: o, pgBoss: p, graphile: g } = best as Required<typeof best>;
report("schedule+claim+complete", "jobs/s", o.total, "pg-boss", p.total);
report("schedule+claim+complete", "jobs/s", o.total, "graphile-worker", g.total);
for (const [name, r] of [["ours", o], ["pg-boss", p], ["graphile-worker", g]] as const) {
  console.log(
    `  ${name}: schedule ${r.schedule.toFixed(0)} jobs/s, claim+complete ${
      r.process.toFixed(0)
    } jobs/s`,
  );
}
