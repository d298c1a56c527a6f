// The observability function: metrics (service role) and audit (users and
// services), validation without partial writes, pagination, concurrency.
import assert from "node:assert/strict";
import { app } from "../../supabase/functions/observability/index.ts";
import {
  anonToken,
  call,
  createUser,
  dbTest,
  expectError,
  freshDatabase,
  serviceToken,
  userToken,
} from "../support/harness.ts";

const db = await freshDatabase();
const metric = (over: Record<string, unknown> = {}) => ({
  service_name: "api",
  metric_type: "latency",
  metric_name: "request_duration",
  value: 150,
  ...over,
});

dbTest("service role records one metric with the spec's fields", async () => {
  const res = await call(app, "POST", "/observability/metrics", {
    token: await serviceToken(),
    body: metric({ unit: "ms", tags: { endpoint: "/api/trips" } }),
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const [row] = await db.sql`select * from public.system_metrics where id = ${res.body.id}`;
  assert.equal(row.value, 150);
  assert.equal(row.unit, "ms");
  assert.deepEqual(row.tags, { endpoint: "/api/trips" });
  assert.equal(row.correlation_id, res.headers.get("x-correlation-id"));
});

dbTest("a batch of metrics is written in one go; one bad element writes none", async () => {
  const token = await serviceToken();
  const metrics = Array.from({ length: 250 }, (_, i) => metric({ metric_name: "batch", value: i }));
  const ok = await call(app, "POST", "/observability/metrics", { token, body: { metrics } });
  assert.equal(ok.status, 201, JSON.stringify(ok.body));
  assert.equal(ok.body.recorded, 250);

  // NaN goes out as null, which validation refuses before any SQL runs.
  const bad = [...metrics.slice(0, 10), metric({ metric_name: "batch", value: Number.NaN })];
  const err = expectError(
    await call(app, "POST", "/observability/metrics", { token, body: { metrics: bad } }),
    400,
    "invalid_request",
  );
  assert.deepEqual((err.details as { path: string }[]).map((d) => d.path), ["metrics.10.value"]);
  const tooMany = Array.from({ length: 1001 }, () => metric({ metric_name: "batch" }));
  expectError(
    await call(app, "POST", "/observability/metrics", { token, body: { metrics: tooMany } }),
    400,
    "invalid_request",
  );
  const [row] = await db
    .sql`select count(*)::int as n from public.system_metrics where metric_name = 'batch'`;
  assert.equal(row.n, 250);

  // jsonb cannot hold \u0000, which JSON and validation allow: only Postgres
  // refuses this last element, and the ten valid ones before it stay unwritten.
  const nul = [
    ...Array.from({ length: 10 }, (_, i) => metric({ metric_name: "batch_nul", value: i })),
    metric({ metric_name: "batch_nul", tags: { k: "a\u0000" } }),
  ];
  const count = async () =>
    (await db
      .sql`select count(*)::int as n from public.system_metrics where metric_name = 'batch_nul'`)[0]
      .n;
  assert.equal(await count(), 0);
  expectError(
    await call(app, "POST", "/observability/metrics", { token, body: { metrics: nul } }),
    400,
    "invalid_input",
  );
  assert.equal(await count(), 0);
});

dbTest("metric stats give avg/min/max/p95 per bucket", async () => {
  const token = await serviceToken();
  const at = "2026-03-10T10:00:30Z";
  const metrics = Array.from(
    { length: 100 },
    (_, i) => metric({ service_name: "stats", metric_name: "lat", value: i + 1, recorded_at: at }),
  );
  assert.equal(
    (await call(app, "POST", "/observability/metrics", { token, body: { metrics } })).status,
    201,
  );
  const res = await call(
    app,
    "GET",
    "/observability/metrics?service_name=stats&metric_name=lat&from=2026-03-10T10:00:00Z&to=2026-03-10T11:00:00Z&bucket_seconds=60",
    { token },
  );
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.body.buckets.length, 1);
  const [b] = res.body.buckets;
  assert.equal(b.count, 100);
  assert.equal(b.avg, 50.5);
  assert.equal(b.min, 1);
  assert.equal(b.max, 100);
  assert.ok(Math.abs(b.p95 - 95.05) < 1e-9, `p95 was ${b.p95}`);
  assert.equal(new Date(b.bucket).toISOString(), "2026-03-10T10:00:00.000Z");

  expectError(
    await call(
      app,
      "GET",
      "/observability/metrics?service_name=stats&metric_name=lat&bucket_seconds=0",
      { token },
    ),
    400,
  );
  expectError(
    await call(
      app,
      "GET",
      "/observability/metrics?service_name=stats&metric_name=lat&from=2026-03-10T11:00:00Z&to=2026-03-10T10:00:00Z",
      { token },
    ),
    400,
    "invalid_window",
  );
  const user = await createUser(db);
  expectError(
    await call(app, "GET", "/observability/metrics?service_name=stats&metric_name=lat", {
      token: await userToken(user),
    }),
    403,
  );
});

dbTest("a user's audit event is recorded as themselves, whatever they claim", async () => {
  const alice = await createUser(db);
  const res = await call(app, "POST", "/observability/audit", {
    token: await userToken(alice),
    body: {
      old_data: "pending",
      new_data: { status: "accepted", fare: 5000 },
      actor_type: "admin",
      actor_identifier: "root",
      action: "trip_created",
      resource_type: "trip",
      resource_id: "trip-1",
      user_id: crypto.randomUUID(),
    },
    headers: { "user-agent": "easymo-app/1.0", "x-forwarded-for": "41.186.0.1, 10.0.0.1" },
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const [row] = await db.sql`select * from public.system_audit_logs where id = ${res.body.id}`;
  assert.equal(row.actor_type, "user");
  assert.equal(row.actor_identifier, alice);
  assert.equal(row.user_id, alice);
  assert.equal(row.user_agent, "easymo-app/1.0");
  assert.equal(row.ip_address, "41.186.0.1");
  assert.equal(row.old_data, "pending");
  assert.deepEqual(row.new_data, { status: "accepted", fare: 5000 });
});

// Deno hands header bytes over one character per byte: "CaféApp" sent as
// UTF-8 arrives as "CafÃ©App" and was stored so. Bytes that are not UTF-8 are
// kept as they are; a long agent is cut between code points.
dbTest("a user agent is stored as the text the client sent", async () => {
  const token = await userToken(await createUser(db));
  const cases: [string, string][] = [
    ["Caf\u00c3\u00a9App/1.0 \u00f0\u009f\u009a\u0095", "CaféApp/1.0 \u{1f695}"],
    ["Caf\u00e9App/1.0", "Caf\u00e9App/1.0"],
    [
      "a".repeat(510) + "\u00f0\u009f\u009a\u0095".repeat(3),
      "a".repeat(510) + "\u{1f695}".repeat(2),
    ],
  ];
  for (const [sent, stored] of cases) {
    const res = await call(app, "POST", "/observability/audit", {
      token,
      body: { actor_type: "user", actor_identifier: "x", action: "ua_probe" },
      headers: { "user-agent": sent },
    });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const [row] = await db.sql`select user_agent from public.system_audit_logs
                               where id = ${res.body.id}`;
    assert.equal(row.user_agent, stored);
  }
});

dbTest("malformed audit input is a 400 or is left out, never a 500 or a lost write", async () => {
  const alice = await createUser(db);
  const token = await userToken(alice);
  const event = { actor_type: "user", actor_identifier: "x", action: "deep_probe" };
  let deep: unknown = 1;
  for (let i = 0; i < 20_000; i++) deep = [deep];
  for (const field of ["old_data", "new_data"]) {
    expectError(
      await call(app, "POST", "/observability/audit", { token, body: { ...event, [field]: deep } }),
      400,
      "invalid_request",
    );
  }
  // "__proto__" would be dropped by the copy zod makes: refused, not lost
  const proto = await call(app, "POST", "/observability/audit", {
    token,
    body: `{"actor_type":"user","actor_identifier":"x","action":"deep_probe",` +
      `"metadata":{"__proto__":{"env":"prod"},"a":1}}`,
  });
  expectError(proto, 400, "invalid_json");
  // the same key spelled with escapes is the same key
  for (const key of ["\\u005f_proto__", "__pro\\u0074o__"]) {
    const escaped = await call(app, "POST", "/observability/audit", {
      token,
      body: `{"actor_type":"user","actor_identifier":"x","action":"deep_probe",` +
        `"metadata":{"${key}":{"env":"prod"},"a":1}}`,
    });
    expectError(escaped, 400, "invalid_json");
  }
  // the text alone is no reason: a long array beside it is walked, not a 500
  const long = await call(app, "POST", "/observability/audit", {
    token,
    body: {
      ...event,
      action: "long_array",
      old_data: new Array(300_000).fill(0),
      new_data: "__proto__",
    },
  });
  assert.equal(long.status, 201, JSON.stringify(long.body).slice(0, 300));
  const [{ n }] = await db.sql`select count(*)::int as n from public.system_audit_logs
                               where action = 'deep_probe'`;
  assert.equal(n, 0);
  // an address that is no address is left out; the event is written
  for (const forwarded of ["1.2.3", "dead", "::::", "fe80::1%eth0"]) {
    const res = await call(app, "POST", "/observability/audit", {
      token,
      body: { ...event, action: "odd_address" },
      headers: { "x-forwarded-for": forwarded },
    });
    assert.equal(res.status, 201, `${forwarded}: ${JSON.stringify(res.body)}`);
    const [row] = await db
      .sql`select ip_address from public.system_audit_logs where id = ${res.body.id}`;
    assert.equal(row.ip_address, null);
  }
});

dbTest("a trailing slash names the same route", async () => {
  const res = await call(app, "POST", "/observability/metrics/", {
    token: await serviceToken(),
    body: metric({ metric_name: "slash" }),
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const [{ n }] = await db.sql`select count(*)::int as n from public.system_metrics
                               where metric_name = 'slash'`;
  assert.equal(n, 1);
});

dbTest(
  "users list only their own audit events; service role lists all; pagination is stable",
  async () => {
    const alice = await createUser(db);
    const bob = await createUser(db);
    const aliceToken = await userToken(alice);
    for (let i = 0; i < 5; i++) {
      const r = await call(app, "POST", "/observability/audit", {
        token: aliceToken,
        body: {
          actor_type: "user",
          actor_identifier: alice,
          action: "page_viewed",
          resource_type: "page",
          resource_id: `p-${i}`,
        },
      });
      assert.equal(r.status, 201);
    }
    await call(app, "POST", "/observability/audit", {
      token: await userToken(bob),
      body: {
        actor_type: "user",
        actor_identifier: bob,
        action: "page_viewed",
        resource_type: "page",
        resource_id: "bob-page",
      },
    });

    const seen: string[] = [];
    let cursor: string | null = null;
    let pages = 0;
    do {
      const q: string = `/observability/audit?resource_type=page&limit=2${
        cursor ? `&cursor=${cursor}` : ""
      }`;
      const page = await call(app, "GET", q, { token: aliceToken });
      assert.equal(page.status, 200, JSON.stringify(page.body));
      for (const e of page.body.data) {
        assert.equal(e.user_id, alice);
        seen.push(e.resource_id);
      }
      cursor = page.body.next_cursor;
      pages++;
    } while (cursor && pages < 10);
    assert.deepEqual(seen, ["p-4", "p-3", "p-2", "p-1", "p-0"]);
    assert.equal(pages, 3);

    const bobView = await call(app, "GET", "/observability/audit?resource_id=p-1", {
      token: await userToken(bob),
    });
    assert.deepEqual(bobView.body.data, []);

    const all = await call(app, "GET", "/observability/audit?resource_type=page&limit=100", {
      token: await serviceToken(),
    });
    assert.equal(all.body.data.length, 6);

    expectError(
      await call(app, "GET", "/observability/audit?cursor=garbage!", { token: aliceToken }),
      400,
      "invalid_cursor",
    );
    expectError(await call(app, "GET", "/observability/audit?limit=0", { token: aliceToken }), 400);
  },
);

dbTest("audit events can be found by correlation id", async () => {
  const token = await serviceToken();
  await call(app, "POST", "/observability/audit", {
    token,
    body: { actor_type: "service", actor_identifier: "wallet-service", action: "transfer_checked" },
    headers: { "x-correlation-id": "corr-audit-1" },
  });
  const res = await call(app, "GET", "/observability/audit?correlation_id=corr-audit-1", { token });
  assert.equal(res.body.data.length, 1);
  assert.equal(res.body.data[0].actor_identifier, "wallet-service");
});

dbTest("anon can neither write nor read audit events", async () => {
  const token = await anonToken();
  expectError(
    await call(app, "POST", "/observability/audit", {
      token,
      body: { actor_type: "user", actor_identifier: "x", action: "y" },
    }),
    401,
  );
  expectError(await call(app, "GET", "/observability/audit", { token }), 401);
});

/** n single-metric POSTs at once, as the service role. */
async function postMetrics(
  n: number,
  request: (i: number) => { body: unknown; headers?: Record<string, string> },
) {
  const token = await serviceToken();
  return await Promise.all(
    Array.from(
      { length: n },
      (_, i) => call(app, "POST", "/observability/metrics", { token, ...request(i) }),
    ),
  );
}

dbTest(
  "50 concurrent metrics all land, share transactions, and each answer is its own row",
  async () => {
    const results = await postMetrics(50, (i) => ({
      headers: { "x-correlation-id": `coalesced-${i}` },
      body: metric({ metric_name: "coalesced", value: i }),
    }));
    assert.deepEqual(results.map((r) => r.status), Array(50).fill(201));
    const rows = await db.sql`select id::text, value, correlation_id, xmin::text as tx
                            from public.system_metrics where metric_name = 'coalesced'`;
    assert.equal(rows.length, 50);
    const byId = new Map(rows.map((r) => [r.id, r]));
    results.forEach((res, i) => {
      const row = byId.get(res.body.id);
      assert.ok(row, `request ${i} answered with id ${res.body.id}, which is not its row`);
      assert.equal(row.value, i);
      assert.equal(row.correlation_id, `coalesced-${i}`);
    });
    // Requests that queued behind the first ones were committed together.
    assert.ok(new Set(rows.map((r) => r.tx)).size < 50, "every metric had its own transaction");
  },
);

dbTest("one metric the database refuses fails alone among concurrent ones", async () => {
  const results = await postMetrics(20, (i) => ({
    // jsonb cannot hold \u0000, which JSON allows: only Postgres notices.
    body: metric({ metric_name: "one_bad", value: i, tags: { k: i === 13 ? "a\u0000" : "ok" } }),
  }));
  results.forEach((res, i) => {
    if (i === 13) expectError(res, 400, "invalid_input");
    else assert.equal(res.status, 201, JSON.stringify(res.body));
  });
  const [row] = await db.sql`select count(*)::int as n, sum(value)::int as s
                             from public.system_metrics where metric_name = 'one_bad'`;
  assert.equal(row.n, 19);
  assert.equal(row.s, (19 * 20) / 2 - 13);
});

dbTest("the maintenance route moves DEFAULT rows into new partitions", async () => {
  await db
    .sql`insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
               values ('api', 'latency', 'far', 1, now() + interval '5 years')`;
  const res = await call(app, "POST", "/observability/maintenance", {
    token: await serviceToken(),
  });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.ok(res.body.actions.some((a: { rows_moved: number }) => a.rows_moved === 1));
  assert.equal(res.body.stopped, "drained");
  assert.deepEqual(res.body.remaining, []);
  const [row] = await db.sql`select count(*)::int as n from public.system_metrics_default`;
  assert.equal(row.n, 0);
  const user = await createUser(db);
  expectError(
    await call(app, "POST", "/observability/maintenance", { token: await userToken(user) }),
    403,
  );
});

dbTest("the maintenance route refuses a malformed body", async () => {
  const token = await serviceToken();
  const bodies = [
    { budget_ms: 0 },
    { budget_ms: 600_000 },
    { budget_ms: "1000" },
    { budget_ms: 1000.5 },
    { budgetMs: 1000 },
    [],
    "not json",
  ];
  for (const body of bodies) {
    const res = await call(app, "POST", "/observability/maintenance", { token, body });
    expectError(res, 400);
  }
});
