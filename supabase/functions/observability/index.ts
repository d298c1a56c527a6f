// observability: metrics and the audit trail over HTTP.
//
//   POST /observability/metrics       one metric or {"metrics": [...]} (service role)
//   GET  /observability/metrics       per-bucket avg/min/max/p95 (service role)
//   POST /observability/audit         write an audit event (user or service role)
//   GET  /observability/audit         own events (users) or all (service role), paginated
//   POST /observability/maintenance   run partition maintenance now, a step at a time
//                                     within a time budget (service role)
import { isIP } from "node:net";
import { z } from "zod";
import {
  cursorTimestamp,
  jsonObject,
  jsonValue,
  oneOrBatch,
  pageQuery,
  queryInt,
  text,
  timestamp,
} from "../../../shared/schemas.ts";
import { authenticate, requireService, requireUserOrService } from "../../../shared/auth.ts";
import type { Principal } from "../../../shared/auth.ts";
import { coalescer } from "../../../shared/coalesce.ts";
import { asJson, dbText, rpc } from "../../../shared/db.ts";
import {
  createApp,
  decodeCursor,
  headerText,
  jsonBody,
  keysetPage,
  queryParams,
} from "../../../shared/http.ts";
import { maintainPartitions } from "./maintenance.ts";

const metric = z.object({
  service_name: z.string().regex(/^[a-z0-9][a-z0-9_.-]{0,62}$/),
  metric_type: z.string().regex(/^[a-z][a-z0-9_]{0,31}$/),
  metric_name: z.string().regex(/^[a-zA-Z][a-zA-Z0-9_.:/-]{0,127}$/),
  // bounded as system_metrics.value is: a window's stats must not overflow
  value: z.number().min(-1e300).max(1e300),
  unit: text(32).optional(),
  tags: jsonObject.optional(),
  correlation_id: text(128).optional(),
  recorded_at: timestamp.optional(),
}).strict();

const metricsBody = oneOrBatch(metric, "metrics");

const statsQuery = z.object({
  service_name: text(63),
  metric_name: text(128),
  from: timestamp.optional(),
  to: timestamp.optional(),
  bucket_seconds: queryInt(1, 2678400, 60),
}).strict();

const auditBody = z.object({
  actor_type: z.enum(["user", "service", "system", "admin"]),
  actor_identifier: text(256),
  action: z.string().regex(/^[a-zA-Z][a-zA-Z0-9_.:-]{0,127}$/),
  resource_type: text(64).optional(),
  resource_id: text(256).optional(),
  old_data: jsonValue.optional(),
  new_data: jsonValue.optional(),
  metadata: jsonObject.optional(),
  status: z.enum(["success", "failure", "denied"]).optional(),
  error_message: z.string().max(2000).optional(),
  request_id: text(128).optional(),
  user_id: z.uuid().optional(),
}).strict();

const auditQuery = z.object({
  resource_type: text(64).optional(),
  resource_id: text(256).optional(),
  correlation_id: text(128).optional(),
  ...pageQuery,
}).strict();

// How long a maintenance call goes on starting backlog moves: with the move
// it is in (at most DB_STATEMENT_TIMEOUT_MS), well inside the edge runtime's
// 150 s of wall clock.
const MAINTENANCE_BUDGET_MS = 25_000;

const maintenanceBody = z.object({
  budget_ms: z.number().int().min(1).max(120_000).optional(),
}).strict();

const auditCursor = z.object({ c: cursorTimestamp, i: z.number().int().nonnegative() });

// Single-metric POSTs from one caller that arrive together are committed as
// one multi-row insert (see shared/coalesce.ts): metrics are the hottest write
// there is, and Postgres spends more per statement than per row.
// Calls share a batch when their claims are the same (a batch runs under one
// set of claims); the key is the claims' text, so batching does not depend on
// the token cache handing out the same object.
type MetricCall = { who: Principal; correlationId: string; args: Record<string, unknown> };
const recordMetric = coalescer<string, MetricCall, string>(
  async (_claims, calls) => {
    const rows = await rpc(
      calls[0].who,
      calls[0].correlationId,
      "public.record_metrics_returning_ids",
      {
        metrics: calls.map((c) => c.args),
      },
    );
    return rows.map((row) => String(row.id));
  },
  async (_claims, call) => {
    const [row] = await rpc(call.who, call.correlationId, "public.record_metric", call.args);
    return String(row.record_metric);
  },
  { maxBatch: 100, maxInFlight: 2 },
);

export const app = createApp("observability");
app.use("*", authenticate());

app.post("/metrics", async (c) => {
  const who = requireService(c);
  const { batch, items } = await jsonBody(c, metricsBody);
  const correlationId = c.get("correlationId");
  if (batch) {
    const [row] = await rpc(who, correlationId, "public.record_metrics", {
      metrics: items,
      correlation_id: correlationId,
    });
    return c.json({ recorded: row.record_metrics }, 201);
  }
  const id = await recordMetric(JSON.stringify(who.claims), {
    who,
    correlationId,
    args: { ...items[0], correlation_id: items[0].correlation_id ?? correlationId },
  });
  return c.json({ id, recorded: 1 }, 201);
});

app.get("/metrics", async (c) => {
  const who = requireService(c);
  const q = queryParams(c, statsQuery);
  const to = q.to ?? new Date().toISOString();
  const from = q.from ?? new Date(Date.parse(to) - 3600_000).toISOString();
  const buckets = await rpc(who, c.get("correlationId"), "public.get_metric_stats", {
    service_name: q.service_name,
    metric_name: q.metric_name,
    from,
    to,
    bucket_seconds: q.bucket_seconds,
  });
  return c.json({
    service_name: q.service_name,
    metric_name: q.metric_name,
    from,
    to,
    bucket_seconds: q.bucket_seconds,
    buckets: buckets.map((b) => ({ ...b, count: Number(b.count) })),
  });
});

app.post("/audit", async (c) => {
  const who = requireUserOrService(c);
  const body = await jsonBody(c, auditBody);
  const correlationId = c.get("correlationId");
  // the client's address as the proxy in front passed it on (first hop)
  const ip = c.req.header("x-forwarded-for")?.split(",")[0]?.trim();
  const [row] = await rpc(who, correlationId, "public.log_audit_event", {
    ...body,
    old_data: asJson(body.old_data),
    new_data: asJson(body.new_data),
    metadata: body.metadata ?? {},
    // isIP takes an IPv6 zone id ("fe80::1%eth0"), which inet refuses
    ip_address: ip && isIP(ip) && !ip.includes("%") ? ip : undefined,
    user_agent: dbText(headerText(c, "user-agent") ?? "", 512) || undefined,
    correlation_id: correlationId,
  });
  return c.json({ id: String(row.log_audit_event) }, 201);
});

app.get("/audit", async (c) => {
  const who = requireUserOrService(c);
  const q = queryParams(c, auditQuery);
  const after = q.cursor ? decodeCursor(q.cursor, auditCursor) : undefined;
  const rows = await rpc(who, c.get("correlationId"), "public.list_audit_events", {
    resource_type: q.resource_type,
    resource_id: q.resource_id,
    correlation_id: q.correlation_id,
    limit: q.limit + 1,
    before_created_at: after?.c,
    before_id: after?.i,
  }, "cursor");
  return c.json(keysetPage(
    rows,
    q.limit,
    (last) => ({ c: last.cursor_ts, i: Number(last.id) }),
    ({ cursor_ts: _, ...r }) => ({ ...r, id: String(r.id) }),
  ));
});

app.post("/maintenance", async (c) => {
  const who = requireService(c);
  const body = await jsonBody(c, maintenanceBody.default({}));
  const budgetMs = body.budget_ms ?? MAINTENANCE_BUDGET_MS;
  return c.json(await maintainPartitions(who, c.get("correlationId"), budgetMs));
});

if (import.meta.main) Deno.serve(app.fetch);
