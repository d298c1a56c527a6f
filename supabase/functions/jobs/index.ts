// jobs: background jobs over HTTP.
//
//   POST /jobs               schedule a job (user or service role; Idempotency-Key)
//   GET  /jobs/:id           a job's status (own jobs for users, any for the service role)
//   POST /jobs/:id/cancel    cancel a pending or running job (owner or service role)
//   POST /jobs/:id/retry     run again now (owner or service role)
//   POST /jobs/run           the worker: drains due jobs within a time budget
//                            (service role; cron calls it every minute)
import { z } from "zod";
import { bigintId, jsonObject, noBody, text, timestamp } from "../../../shared/schemas.ts";
import { authenticate, requireService, requireUserOrService } from "../../../shared/auth.ts";
import { env } from "../../../shared/env.ts";
import { type Row, rpc } from "../../../shared/db.ts";
import { badRequest } from "../../../shared/errors.ts";
import {
  createApp,
  createdOrReplayed,
  type Ctx,
  idempotencyKeyOf,
  jsonBody,
  pathParams,
} from "../../../shared/http.ts";
import { JOB_TYPE, registeredJobTypes } from "./handlers.ts";
import { runJobs } from "./worker.ts";

const jobType = z.string().regex(JOB_TYPE);
const jobId = z.object({ id: bigintId });

const scheduleBody = z.object({
  job_type: jobType,
  job_name: text(200),
  payload: jsonObject.default({}),
  run_at: timestamp.optional(),
  priority: z.number().int().min(0).max(1000).default(0),
  max_attempts: z.number().int().min(1).max(25).default(3),
  timeout_seconds: z.number().int().min(1).max(120).default(30),
  idempotency_key: text(256).optional(),
}).strict();

const runBody = z.object({
  budget_ms: z.number().int().min(100).max(25_000).optional(),
  concurrency: z.number().int().min(1).max(100).default(10),
  job_types: z.array(jobType).min(1).max(100).optional(),
}).strict();

/**
 * A job as the API shows it: the lease token is the running worker's alone,
 * and `due` is the claim index's bookkeeping (see install_leases).
 */
const toJob = ({ lease_token: _, due: _due, ...r }: Row) => ({ ...r, id: String(r.id) });

export const app = createApp("jobs");
app.use("*", authenticate());

app.post("/", async (c) => {
  const who = requireUserOrService(c);
  const body = await jsonBody(c, scheduleBody);
  const key = idempotencyKeyOf(c, body.idempotency_key);
  const correlationId = c.get("correlationId");
  const [{ created, ...job }] = await rpc(who, correlationId, "public.schedule_job", {
    job_type: body.job_type,
    job_name: body.job_name,
    payload: body.payload,
    run_at: body.run_at,
    priority: body.priority,
    max_attempts: body.max_attempts,
    timeout_seconds: body.timeout_seconds,
    idempotency_key: key,
    correlation_id: correlationId,
  }, { created: "created_at" });
  return createdOrReplayed(c, { job: toJob(job) }, created as boolean);
});

app.post("/run", async (c) => {
  const who = requireService(c);
  const body = await jsonBody(c, runBody.default({ concurrency: 10 }));
  // a job claimed without a handler would only be failed
  const unhandled = body.job_types?.filter((t) => !registeredJobTypes().includes(t)) ?? [];
  if (unhandled.length > 0) {
    throw badRequest("unknown_job_type", `no handler for job types: ${unhandled.join(", ")}`, {
      job_types: unhandled,
    });
  }
  const summary = await runJobs(who, c.get("correlationId"), {
    budgetMs: body.budget_ms ?? env().JOBS_RUN_BUDGET_MS,
    cpuBudgetMs: env().JOBS_RUN_CPU_BUDGET_MS,
    concurrency: body.concurrency,
    jobTypes: body.job_types,
    // Unique to the run, not the caller's correlation id (which callers
    // choose and pass along): a slot takes up jobs held under its name.
    workerId: `jobs-run:${crypto.randomUUID()}`,
  });
  return c.json(summary);
});

/** A route acting on one job through one SQL function (ownership is decided in SQL). */
function jobAction(fn: string) {
  return async (c: Ctx) => {
    const who = requireUserOrService(c);
    const { id } = pathParams(c, jobId);
    await jsonBody(c, noBody);
    const [row] = await rpc(who, c.get("correlationId"), fn, { job_id: id });
    return c.json({ job: toJob(row) });
  };
}

app.get("/:id", jobAction("public.get_job"));
app.post("/:id/cancel", jobAction("public.cancel_job"));
app.post("/:id/retry", jobAction("public.retry_job"));

if (import.meta.main) Deno.serve(app.fetch);
