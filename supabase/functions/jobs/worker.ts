// The jobs worker: `concurrency` slots, each running one job at a time. A
// slot runs the job's registered handler under its timeout, then settles it
// (complete, or fail with backoff / time out) and claims its next job in the
// same call (public.settle_and_claim_jobs): one round trip per job, and a slow
// job holds up only its own slot. Slots stop claiming once the time budget
// is spent, so a cron-triggered run ends well inside the edge runtime's 150 s:
// the budget (at most 25 s) plus the longest job timeout (at most 120 s),
// with every database call cut off at 148 s; or once the CPU budget is,
// inside the runtime's 2 s of CPU a request.
import process from "node:process";
import type { Principal } from "../../../shared/auth.ts";
import { dbText, type Row, rpc, TextArray } from "../../../shared/db.ts";
import { HttpError, isInputError } from "../../../shared/errors.ts";
import { log } from "../../../shared/log.ts";
import { jsonDepth, jsonTextDepth, MAX_JSON_DEPTH } from "../../../shared/schemas.ts";
import { type Job, jobHandler, registeredJobTypes } from "./handlers.ts";

export interface RunOptions {
  budgetMs: number;
  /** CPU the process may spend during the run (every request's, so the run's at most); none: no limit */
  cpuBudgetMs?: number;
  concurrency: number;
  jobTypes?: string[];
  workerId: string;
  /** How long the run may last in all, its database calls cut off there (default RUN_END_MS) */
  endMs?: number;
}

export interface RunSummary {
  claimed: number;
  completed: number;
  failed: number;
  timed_out: number;
  lease_lost: number;
  elapsed_ms: number;
  stopped: "drained" | "budget";
  /** due jobs of types no handler is registered for, by type (they wait until one is) */
  unhandled: Record<string, number>;
}

type Outcome = "completed" | "failed" | "timed_out" | "lease_lost";

const TIMED_OUT = Symbol("timed out");

/** A job's lease is its timeout plus this (install_leases: time for the holder to report). */
const LEASE_GRACE_S = 10;
/** A settlement refused with 503 is sent again after 100 ms, doubling to 2 s ... */
const SETTLE_RETRY_MS = 100;
const SETTLE_RETRY_MAX_MS = 2_000;
/** ... while it would still arrive this long before the lease ends ... */
const SETTLE_RETRY_MARGIN_MS = 2_000;
/**
 * The edge runtime ends a request at 150 s: a run's database calls are cut
 * off (503) this long after it started, answered or not, so that it answers
 * itself ...
 */
const RUN_END_MS = 148_000;
/** ... and settlements are sent again, and held jobs taken up, only this long before that. */
const RUN_END_MARGIN_MS = 3_000;

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

/** How a job's attempt ended, as the settling call takes it. */
interface Settlement {
  /** the handler's result as the JSON text stored (null: no result) */
  result?: string | null;
  /**
   * Why the handler's result is not kept: the handler ran to its end, so the
   * job completes without its result rather than run again (a result that
   * cannot be stored would not be storable the next time either).
   */
  resultError?: string;
  error?: string;
  timedOut?: boolean;
  /** the error stands in for a result or error the database refused */
  replaced?: boolean;
}

/** The largest result a job keeps, as JSON text. */
export const MAX_RESULT_BYTES = 1024 * 1024;

const TOO_DEEP = `the handler's result nests deeper than ${MAX_JSON_DEPTH} levels`;

/**
 * A handler's result as it is stored: the JSON text of an object (or
 * nothing), made once here and sent as made, so that what is measured is what
 * is stored (a toJSON may make it deeper than the object looked).
 */
function storable(result: unknown): Settlement {
  if (result === null) return { result: null };
  const refused = (why: string): Settlement => ({ result: null, resultError: why });
  let text: string;
  try {
    // Postgres refuses deeper JSON with a stack error, not an input error,
    // and JSON.stringify itself overflows far down: measured before and after.
    if (jsonDepth(result) > MAX_JSON_DEPTH) return refused(TOO_DEEP);
    text = JSON.stringify(result);
  } catch (err) {
    return refused(`the handler's result is not JSON: ${errorText(err)}`);
  }
  // by its JSON, not its type: a Date, a URL or a decimal is an object whose JSON is not one
  if (!text?.startsWith("{")) return refused("the handler's result must be a JSON object");
  if (new TextEncoder().encode(text).length > MAX_RESULT_BYTES) {
    return refused(`the handler's result is larger than ${MAX_RESULT_BYTES} bytes`);
  }
  return jsonTextDepth(text) > MAX_JSON_DEPTH ? refused(TOO_DEEP) : { result: text };
}

/**
 * An error as job.last_error keeps it: its message (as JSON if it is not
 * text), else the error's JSON, else its text. Whatever a handler throws (an
 * object without a prototype, a message that is not text, a getter that
 * throws), this does not: the attempt must fail, not the run.
 */
function errorText(err: unknown): string {
  const message = () => (err as { message?: unknown } | null | undefined)?.message;
  const readings = [
    message,
    () => typeof message() === "string" ? undefined : JSON.stringify(message()),
    () => typeof err === "string" ? err : JSON.stringify(err),
    () => String(err),
  ];
  for (const read of readings) {
    try {
      const text = read();
      if (typeof text === "string" && text !== "" && text !== "{}") {
        return dbText(text, 4000) || "error";
      }
    } catch {
      // the next reading
    }
  }
  return "error";
}

/** Runs a job's handler under its timeout; never throws. */
async function attempt(job: Job, correlationId: string): Promise<Settlement> {
  const handler = jobHandler(job.job_type);
  const controller = new AbortController();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<typeof TIMED_OUT>((resolve) => {
    timer = setTimeout(() => resolve(TIMED_OUT), job.timeout_seconds * 1000);
  });
  try {
    if (!handler) throw new Error(`no handler for job type ${job.job_type}`);
    const ctx = { signal: controller.signal, correlationId: job.correlation_id ?? correlationId };
    const outcome = await Promise.race([handler(job, ctx), deadline]);
    if (outcome === TIMED_OUT) {
      controller.abort();
      return { error: `timed out after ${job.timeout_seconds} s`, timedOut: true };
    }
    return storable(outcome ?? null);
  } catch (err) {
    return { error: errorText(err) };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The process's CPU time so far, in ms; undefined where the runtime does not
 * tell (then only the clock budget holds).
 */
function cpuMs(): number | undefined {
  try {
    const { user, system } = process.cpuUsage();
    return (user + system) / 1000;
  } catch {
    return undefined;
  }
}

/**
 * Whether one more job fits in `budgetMs` of process CPU from now on (no
 * budget: always): the CPU spent so far, plus the jobs in hand and the one to
 * claim at the CPU a finished job has taken on average. A check of the spent
 * CPU alone let the jobs in the other slots overrun the budget by the slots
 * times a job's CPU.
 */
function cpuBudget(
  budgetMs: number | undefined,
): (inHand: number, finished: number) => boolean {
  const start = budgetMs === undefined ? undefined : cpuMs();
  if (budgetMs === undefined || start === undefined) return () => true;
  return (inHand, finished) => {
    const spent = (cpuMs() ?? start) - start;
    return spent + (inHand + 1) * (spent / Math.max(finished, 1)) < budgetMs;
  };
}

/** A slot's claim: the job types, one job, and the slot's name. */
type Claim = { job_types: TextArray; limit: number; worker: string };

/** A job a slot holds: its lease token, when the lease ends (performance.now() time), the slot's claim. */
interface Held {
  job: Job;
  lease: string;
  leaseEnds: number;
  claim: Claim;
}

const outcomeOf = (s: Settlement): Outcome =>
  s.error === undefined ? "completed" : s.timedOut ? "timed_out" : "failed";

/** Runs due jobs until none are left or the budget is spent. */
export async function runJobs(
  who: Principal,
  correlationId: string,
  opts: RunOptions,
): Promise<RunSummary> {
  const started = performance.now();
  const ends = started + (opts.endMs ?? RUN_END_MS);
  /** The time a database call has left: no call outlives the run. */
  const left = () => ends - performance.now();
  const call = (fn: string, args: Record<string, unknown>, columns: readonly string[]) =>
    rpc(who, correlationId, fn, args, { columns }, left());
  const cpuLeft = cpuBudget(opts.cpuBudgetMs);
  const summary: RunSummary = {
    claimed: 0,
    completed: 0,
    failed: 0,
    timed_out: 0,
    lease_lost: 0,
    elapsed_ms: 0,
    stopped: "drained",
    unhandled: {},
  };
  const types = opts.jobTypes ?? registeredJobTypes();
  const jobTypes = new TextArray(types);
  // The first slot to fail stops the others claiming; they finish the job in
  // hand, and the run reports the failure only then, so no slot outlives it.
  let failure: { error: unknown } | undefined;
  // Jobs claimed and not yet done, over all slots, and the claims on their
  // way: a claim counts from the moment a slot decides on it, or the slots
  // deciding while it travels overran the CPU budget by a job each.
  let inHand = 0;
  const finished = () =>
    summary.completed + summary.failed + summary.timed_out + summary.lease_lost;
  const inBudget = () =>
    !failure && performance.now() - started < opts.budgetMs && cpuLeft(inHand, finished());
  const claiming = async (fn: string, args: Record<string, unknown>) =>
    (await call(fn, args, CLAIMED_COLUMNS))[0];
  /** A job held under the slot's name, taken up on a fresh lease if its timeout fits the run's time left. */
  const reclaimHeld = async (claim: Claim) => {
    const secondsLeft = Math.floor((left() - RUN_END_MARGIN_MS) / 1000);
    if (secondsLeft <= 0) return undefined;
    return await claiming("public.reclaim_held_jobs", {
      worker: claim.worker,
      max_timeout_seconds: secondsLeft,
    });
  };
  /**
   * Claims the slot's next job. A claim answered 503 may have committed, its
   * answer lost: the job it took is held under the slot's name and is taken
   * up, not left to wait out its lease (a job allowed one attempt ended
   * timed out, never run). Else the claim is sent once more; a second 503
   * ends the run.
   */
  const claimJob = async (claim: Claim): Promise<Row | undefined> => {
    try {
      return await claiming("public.claim_jobs", claim);
    } catch (err) {
      if (!(err instanceof HttpError && err.status === 503)) throw err;
      await new Promise((r) => setTimeout(r, SETTLE_RETRY_MS));
      return await reclaimHeld(claim) ?? await claiming("public.claim_jobs", claim);
    }
  };

  /**
   * Settles an attempt and, while the budget lasts, claims the slot's next
   * job in the same call. The lease's end bounds the retries of a settlement
   * the database could not take (503).
   */
  const settle = async (
    held: Held,
    s: Settlement,
    claimNext: boolean,
    retries = 0,
  ): Promise<{ outcome: Outcome; next?: Row; looked: boolean }> => {
    const { job, lease, leaseEnds, claim } = held;
    const settlement = s.error === undefined
      // no result is SQL null, as for a failed or cancelled job, not JSON null
      ? {
        job_id: job.id,
        lease_token: lease,
        // the text as storable made it: a literal becomes the jsonb parameter
        result: s.result ?? undefined,
        result_error: s.resultError,
      }
      : { job_id: job.id, lease_token: lease, error: s.error, timed_out: s.timedOut ?? false };
    try {
      let next: Row | undefined;
      if (claimNext) {
        next = await claiming("public.settle_and_claim_jobs", { ...settlement, ...claim });
      } else {
        const fn = s.error === undefined ? "public.complete_job" : "public.fail_job";
        await call(fn, settlement, SETTLED_COLUMNS);
      }
      if (s.error !== undefined || s.resultError !== undefined) {
        log("warn", s.error === undefined ? "job result not kept" : "job attempt failed", {
          correlation_id: correlationId,
          job_id: job.id,
          job_type: job.job_type,
          attempt: job.attempts,
          error: s.error ?? s.resultError,
        });
      }
      return { outcome: outcomeOf(s), next, looked: claimNext };
    } catch (err) {
      if (err instanceof HttpError && err.code === "lease_lost") {
        // Cancelled, or timed out and reclaimed while it ran: its result is
        // dropped. Or, for a settlement sent again, an earlier send committed
        // and only its answer was lost: its outcome is stored, and a job it
        // claimed is held under the slot's name. That job is taken up on a
        // fresh lease, budget or not (it was claimed within the budget), if
        // its timeout fits in the run's time left; else it waits out its
        // lease.
        let next = retries > 0 ? await reclaimHeld(claim) : undefined;
        if (claimNext && !next) next = await claimJob(claim);
        return { outcome: "lease_lost", next, looked: claimNext };
      }
      // A result or error the database refuses (a NUL inside a result's
      // string, say) is settled once more with a plain reason in its place:
      // else the job would stay running until its lease ran out. A refused
      // result still completes the job (its handler ran to its end); a
      // refused error still fails the attempt.
      if (isInputError(err) && !s.replaced) {
        const code = (err as HttpError).code;
        const replaced: Settlement = s.error === undefined
          ? { result: null, resultError: `result not stored: ${code}`, replaced: true }
          : { error: `error not stored: ${code}`, timedOut: s.timedOut, replaced: true };
        return await settle(held, replaced, claimNext);
      }
      // No connection free, or none answering: sent again while the lease
      // holds and the run may last, since a job whose settlement is given up
      // runs again after its lease, its work done twice. (One that committed
      // before its answer was lost is then lease_lost: its outcome is stored
      // all the same.) The retry claims a next job only if the budget still
      // allows one now: the time spent retrying may have used it up.
      if (err instanceof HttpError && err.status === 503) {
        const pause = Math.min(SETTLE_RETRY_MAX_MS, SETTLE_RETRY_MS * 2 ** retries);
        const until = Math.min(leaseEnds - SETTLE_RETRY_MARGIN_MS, ends - RUN_END_MARGIN_MS);
        if (performance.now() + pause < until) {
          log("warn", "job settlement failed; sending it again", {
            correlation_id: correlationId,
            job_id: job.id,
            error: err.code,
          });
          await new Promise((r) => setTimeout(r, pause));
          return await settle(held, s, claimNext && inBudget(), retries + 1);
        }
      }
      throw err;
    }
  };

  const slot = async (n: number) => {
    if (types.length === 0) return;
    // each slot claims under a name of its own (see public.reclaim_held_jobs)
    const claim = { job_types: jobTypes, limit: 1, worker: `${opts.workerId}/${n}` };
    /** Whether to claim a job now; if so, it is in hand from now. */
    const decide = () => {
      const yes = inBudget();
      if (yes) inHand++;
      return yes;
    };
    // whether the slot last looked for a job, or stopped for the budget
    let looked = decide();
    let row = looked ? await claimJob(claim) : undefined;
    if (looked && !row) inHand--;
    while (row) {
      summary.claimed++;
      const job = toJob(row);
      // the lease began before the claim answered: this end is a little late
      const leaseEnds = performance.now() + (job.timeout_seconds + LEASE_GRACE_S) * 1000;
      const s = await attempt(job, correlationId);
      const lease = row.lease_token as string;
      inHand--;
      const claimNext = decide();
      const settled = await settle({ job, lease, leaseEnds, claim }, s, claimNext);
      // a claim that found nothing (or was dropped on a retry) is no job; a
      // job taken up without one is
      inHand += (settled.next ? 1 : 0) - (claimNext ? 1 : 0);
      summary[settled.outcome]++;
      row = settled.next;
      looked = settled.looked;
    }
    // a slot that stopped without looking for more jobs left them to the next run
    if (!looked) summary.stopped = "budget";
  };
  await Promise.all(
    Array.from({ length: opts.concurrency }, (_, n) =>
      slot(n + 1).catch((error) => {
        failure ??= { error };
      })),
  );
  if (failure) throw failure.error;
  // A drained run of every registered type: what is still due has no handler
  // here (the spec's own payment_processing, say), and would wait unseen.
  if (summary.stopped === "drained" && !opts.jobTypes) {
    const waiting = await call("public.due_jobs_by_type", {
      exclude_types: new TextArray(types),
    }, ["job_type", "due"]);
    for (const { job_type, due } of waiting) summary.unhandled[job_type as string] = Number(due);
    if (waiting.length > 0) {
      log("warn", "due jobs have no handler", {
        correlation_id: correlationId,
        unhandled: summary.unhandled,
      });
    }
  }
  summary.elapsed_ms = Math.round(performance.now() - started);
  return summary;
}
