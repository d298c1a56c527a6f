// The jobs worker: claims due jobs in bounded batches, runs each one's
// registered handler under its timeout, and settles it (complete, or fail
// with backoff / time out). It stops claiming once its time budget is spent,
// so a cron-triggered run ends well inside the edge runtime's 150 s: the
// budget (at most 25 s) plus the longest job timeout (at most 120 s).
import type { Principal } from "../../../shared/auth.ts";
import { asJson, rpc, TextArray } from "../../../shared/db.ts";
import { HttpError } from "../../../shared/errors.ts";
import { log } from "../../../shared/log.ts";
import { type Job, jobHandler, registeredJobTypes } from "./handlers.ts";

export interface RunOptions {
  budgetMs: number;
  batchSize: number;
  jobTypes?: string[];
  workerId: string;
}

export interface RunSummary {
  claimed: number;
  completed: number;
  failed: number;
  timed_out: number;
  lease_lost: number;
  batches: number;
  elapsed_ms: number;
  stopped: "drained" | "budget";
}

type Outcome = "completed" | "failed" | "timed_out" | "lease_lost";

const TIMED_OUT = Symbol("timed out");

/** What the worker reads of a claimed job: toJob's fields and the lease token. */
export const CLAIMED_COLUMNS = [
  "id",
  "job_type",
  "job_name",
  "payload",
  "attempts",
  "max_attempts",
  "timeout_seconds",
  "user_id",
  "correlation_id",
  "lease_token",
] as const;

/** A settlement's answer is only checked for success: its row is not read. */
export const SETTLED_COLUMNS = ["id"] as const;

function toJob(r: Record<string, unknown>): Job {
  return {
    id: String(r.id),
    job_type: r.job_type as string,
    job_name: r.job_name as string,
    payload: r.payload as Record<string, unknown>,
    attempts: r.attempts as number,
    max_attempts: r.max_attempts as number,
    timeout_seconds: r.timeout_seconds as number,
    user_id: (r.user_id as string | null) ?? null,
    correlation_id: (r.correlation_id as string | null) ?? null,
  };
}

async function runOne(
  who: Principal,
  correlationId: string,
  job: Job,
  lease: string,
): Promise<Outcome> {
  const handler = jobHandler(job.job_type);
  const controller = new AbortController();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<typeof TIMED_OUT>((resolve) => {
    timer = setTimeout(() => resolve(TIMED_OUT), job.timeout_seconds * 1000);
  });
  let settle: { result?: Record<string, unknown> | null; error?: string; timedOut?: boolean };
  try {
    if (!handler) throw new Error(`no handler for job type ${job.job_type}`);
    const ctx = { signal: controller.signal, correlationId: job.correlation_id ?? correlationId };
    const outcome = await Promise.race([handler(job, ctx), deadline]);
    if (outcome === TIMED_OUT) {
      controller.abort();
      settle = { error: `timed out after ${job.timeout_seconds} s`, timedOut: true };
    } else {
      settle = { result: outcome ?? null };
    }
  } catch (err) {
    settle = {
      error: (err instanceof Error ? err.message : String(err)).slice(0, 4000) || "error",
    };
  } finally {
    clearTimeout(timer);
  }
  try {
    await (settle.error === undefined
      ? rpc(who, correlationId, "public.complete_job", {
        job_id: job.id,
        lease_token: lease,
        result: asJson(settle.result),
      }, { columns: SETTLED_COLUMNS })
      : rpc(who, correlationId, "public.fail_job", {
        job_id: job.id,
        lease_token: lease,
        error: settle.error,
        timed_out: settle.timedOut ?? false,
      }, { columns: SETTLED_COLUMNS }));
  } catch (err) {
    if (err instanceof HttpError && err.code === "lease_lost") return "lease_lost";
    throw err;
  }
  if (settle.error === undefined) return "completed";
  log("warn", "job attempt failed", {
    correlation_id: correlationId,
    job_id: job.id,
    job_type: job.job_type,
    attempt: job.attempts,
    error: settle.error,
  });
  return settle.timedOut ? "timed_out" : "failed";
}

/** Drains due jobs until none are left or the budget is spent. */
export async function runJobs(
  who: Principal,
  correlationId: string,
  opts: RunOptions,
): Promise<RunSummary> {
  const started = performance.now();
  const summary: RunSummary = {
    claimed: 0,
    completed: 0,
    failed: 0,
    timed_out: 0,
    lease_lost: 0,
    batches: 0,
    elapsed_ms: 0,
    stopped: "budget",
  };
  const types = opts.jobTypes ?? registeredJobTypes();
  while (performance.now() - started < opts.budgetMs) {
    const rows = types.length === 0 ? [] : await rpc(who, correlationId, "public.claim_jobs", {
      job_types: new TextArray(types),
      limit: opts.batchSize,
      worker: opts.workerId,
    }, { columns: CLAIMED_COLUMNS });
    if (rows.length === 0) {
      summary.stopped = "drained";
      break;
    }
    summary.batches++;
    summary.claimed += rows.length;
    const outcomes = await Promise.all(
      rows.map((r) => runOne(who, correlationId, toJob(r), r.lease_token as string)),
    );
    for (const o of outcomes) summary[o]++;
  }
  summary.elapsed_ms = Math.round(performance.now() - started);
  return summary;
}
