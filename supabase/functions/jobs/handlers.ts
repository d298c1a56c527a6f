// The registry of job handlers, one per job type. A handler gets the job and
// an AbortSignal that fires when the job's timeout_seconds run out; what it
// returns (a JSON object, or nothing) is stored as the job's result, what it
// throws fails the attempt (retried with backoff until max_attempts).
//
// The payload is the scheduler's input: a user may schedule jobs too, so a
// handler checks job.user_id before acting on anyone's behalf.
export interface Job {
  id: string;
  job_type: string;
  job_name: string;
  payload: Record<string, unknown>;
  attempts: number;
  max_attempts: number;
  timeout_seconds: number;
  user_id: string | null;
  correlation_id: string | null;
}

export interface JobContext {
  signal: AbortSignal;
  correlationId: string;
}

export type JobHandler = (job: Job, ctx: JobContext) => Promise<Record<string, unknown> | void>;

const registry = new Map<string, JobHandler>();

/** A job type's name, as private.job_type holds it. */
export const JOB_TYPE = /^[a-z][a-z0-9_.-]{0,62}$/;

/** Registers (or replaces) the handler of a job type. */
export function registerJobHandler(jobType: string, handler: JobHandler): void {
  if (!JOB_TYPE.test(jobType)) throw new Error(`invalid job type ${jobType}`);
  registry.set(jobType, handler);
}

export function jobHandler(jobType: string): JobHandler | undefined {
  return registry.get(jobType);
}

/** The job types this worker can run; it claims no others. */
export function registeredJobTypes(): string[] {
  return [...registry.keys()].sort();
}

// --- built-in handlers --------------------------------------------------------

/** Does nothing; handy for checking the pipeline end to end. */
registerJobHandler("noop", () => Promise.resolve({ ok: true }));
