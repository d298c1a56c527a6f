import assert from "node:assert/strict";
import { app } from "../../supabase/functions/observability/index.ts";
import { call, createUser, dbTest, expectError, freshDatabase, serviceToken, userToken } from "../support/harness.ts";

const db = await freshDatabase();

dbTest("service role records one metric", async () => {
  const res = await call(app, "POST", "/observability/metrics", {
    token: await serviceToken(),
    body: { service_name: "api", metric_type: "latency", metric_name: "request_duration", value: 150, unit: "ms", tags: { endpoint: "/api/trips" } },
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const [row] = await db.sql`select * from public.system_metrics where id = ${res.body.id}`;
  assert.equal(row.value, 150);
  assert.deepEqual(row.tags, { endpoint: "/api/trips" });
});

dbTest("a user cannot record metrics", async () => {
  const uid = await createUser(db);
  const res = await call(app, "POST", "/observability/metrics", {
    token: await userToken(uid),
    body: { service_name: "api", metric_type: "latency", metric_name: "x", value: 1 },
  });
  expectError(res, 403, "forbidden");
});
