// Jobs: schedule + claim + complete throughput with a trivial handler, at the
// same concurrency, in the same database and run:
//   ours             public.schedule_job through rpc, then the jobs worker itself (runJobs) with
//                    WORKERS slots: each settles its job and claims the next in one call
//   ours, two calls  the same jobs through claim_jobs(limit 1) + complete_job per job, for
//                    comparison: the shape graphile-worker has
//   pg-boss          send, then workers loop fetch(batchSize 1) + complete
//   graphile-worker  addJob, then its runner with the same concurrency (default settings:
//                    no local queue and no batched completion, i.e. without its batching)
// Every side claims one job per call. Figures: jobs per second over both
// phases, best of ROUNDS rounds; the order of the sides rotates from round to
// round.
import { Logger, makeWorkerUtils, run } from "graphile-worker";
import type { Principal } from "../shared/auth.ts";
import { asJson, closeDb, rpc, TextArray } from "../shared/db.ts";
import { resetEnv } from "../shared/env.ts";
import { registerJobHandler } from "../supabase/functions/jobs/handlers.ts";
import { CLAIMED_COLUMNS, runJobs, SETTLED_COLUMNS } from "../supabase/functions/jobs/worker.ts";
import { BENCH_DB, BENCH_SECRET, drain, report, spread, startPgBoss } from "./lib.ts";

const JOBS = Number(Deno.env.get("BENCH_JOBS") ?? 2000);
const WORKERS = Number(Deno.env.get("BENCH_CONCURRENCY") ?? 4);
const ROUNDS = Number(Deno.env.get("BENCH_ROUNDS") ?? 4);

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

// Ours goes through rpc (shared/db.ts), as the jobs function's worker sends
// it: the request's settings and the call as one simple-protocol message, one
// round trip per call, over a pool of WORKERS connections.
for (
  const [k, v] of Object.entries({
    SUPABASE_DB_URL: BENCH_DB,
    JWT_SECRET: BENCH_SECRET,
    LOG_LEVEL: "silent",
    DB_POOL_SIZE: String(WORKERS),
  })
) Deno.env.set(k, v);
resetEnv();
const service: Principal = { role: "service_role", claims: { role: "service_role" } };

// Processing is timed from the first job handed to a handler, for ours and
// graphile-worker alike: graphile-worker's runner connects its pool and checks
// its schema as it starts (30-40 ms here), a cost a long-running worker pays
// once.
let firstJob: number | undefined;
const noop = () => {
  firstJob ??= performance.now();
  return Promise.resolve();
};
registerJobHandler("bench_noop", noop);

const scheduleOurs = () =>
  spread(WORKERS, JOBS, async (_, i) => {
    await rpc(service, "bench", "public.schedule_job", {
      job_type: "bench_noop",
      job_name: "bench",
      payload: asJson({ i }),
    });
  });

async function ours(): Promise<Rate> {
  const scheduled = await scheduleOurs();
  firstJob = undefined;
  const summary = await runJobs(service, "bench", {
    budgetMs: 600_000,
    concurrency: WORKERS,
    jobTypes: ["bench_noop"],
    workerId: "bench",
  });
  if (summary.completed !== JOBS) throw new Error(`worker: ${JSON.stringify(summary)}`);
  return phases(scheduled, (performance.now() - firstJob!) / 1000);
}

async function oursTwoCalls(): Promise<Rate> {
  const scheduled = await scheduleOurs();
  const processed = await drain(WORKERS, async (w) => {
    const [job] = await rpc(service, "bench", "public.claim_jobs", {
      job_types: new TextArray(["bench_noop"]),
      limit: 1,
      worker: `bench-${w}`,
    }, { columns: CLAIMED_COLUMNS });
    if (!job) return 0;
    await rpc(service, "bench", "public.complete_job", {
      job_id: job.id,
      lease_token: job.lease_token,
    }, { columns: SETTLED_COLUMNS });
    return 1;
  });
  return phases(scheduled, processed);
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
  firstJob = undefined;
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
        return noop();
      },
    },
  });
  await allDone;
  const processed = (performance.now() - firstJob!) / 1000;
  await runner.stop();
  return phases(scheduled, processed);
}

console.log(`jobs: ${JOBS} jobs, ${WORKERS} workers, best of ${ROUNDS} rounds`);
const sides = {
  "ours": ours,
  "ours, two calls": oursTwoCalls,
  "pg-boss": pgBoss,
  "graphile-worker": graphileWorker,
};
type Side = keyof typeof sides;
const names = Object.keys(sides) as Side[];
const best: Partial<Record<Side, Rate>> = {};
for (let r = 0; r < ROUNDS; r++) {
  // round r starts with side r: over as many rounds as sides, every side takes every place
  for (let k = 0; k < names.length; k++) {
    const side = names[(r + k) % names.length];
    best[side] = better(best[side], await sides[side]());
  }
}
await closeDb();
const rates = best as Record<Side, Rate>;
for (const peer of ["pg-boss", "graphile-worker"] as const) {
  report("schedule+claim+complete", "jobs/s", rates.ours.total, peer, rates[peer].total);
}
report(
  "schedule+claim+complete, two calls per job",
  "jobs/s",
  rates["ours, two calls"].total,
  "graphile-worker",
  rates["graphile-worker"].total,
);
for (const name of names) {
  const r = rates[name];
  console.log(
    `  ${name}: schedule ${r.schedule.toFixed(0)} jobs/s, claim+complete ${
      r.process.toFixed(0)
    } jobs/s`,
  );
}
