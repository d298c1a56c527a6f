// The shared HTTP layer and JWT checks, exercised through the observability
// app: every 400/401/403/404/405/413 path, correlation ids, CORS, logging.
import assert from "node:assert/strict";
import { decodeJwt, exportJWK, generateKeyPair, SignJWT } from "jose";
import { app } from "../../supabase/functions/observability/index.ts";
import { resetAuth } from "../../shared/auth.ts";
import { resetEnv } from "../../shared/env.ts";
import {
  anonToken,
  call,
  createUser,
  dbTest,
  expectError,
  freshDatabase,
  serviceToken,
  signToken,
  userToken,
} from "../support/harness.ts";

const db = await freshDatabase();
const METRICS = "/observability/metrics";
const metric = { service_name: "api", metric_type: "latency", metric_name: "rt", value: 1 };

async function metricCount(): Promise<number> {
  const [row] = await db.sql`select count(*)::int as n from public.system_metrics`;
  return row.n;
}

dbTest("missing Authorization is 401 missing_token", async () => {
  const res = await call(app, "POST", METRICS, { body: metric });
  expectError(res, 401, "missing_token");
  assert.match(res.headers.get("www-authenticate") ?? "", /^Bearer/);
});

dbTest("a non-Bearer Authorization is 401", async () => {
  const res = await call(app, "POST", METRICS, {
    body: metric,
    headers: { authorization: "Basic abc" },
  });
  expectError(res, 401, "invalid_token");
});

dbTest("a malformed token is 401", async () => {
  for (const token of ["not-a-jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30"]) {
    expectError(await call(app, "POST", METRICS, { token, body: metric }), 401, "invalid_token");
  }
});

dbTest("an expired token is 401 token_expired", async () => {
  const token = await signToken("service_role", { expiresIn: -60 });
  expectError(await call(app, "POST", METRICS, { token, body: metric }), 401, "token_expired");
});

dbTest("a token without exp is 401, however well signed", async () => {
  const token = await signToken("service_role", { expiresIn: null });
  const res = await call(app, "POST", METRICS, { token, body: metric });
  assert.equal(res.status, 401, JSON.stringify(res.body));
  assert.equal(res.body.error.code, "invalid_token");
});

dbTest("a remembered token stops working when it expires", async () => {
  // at least a second of life for the first call, whatever the clock's fraction
  const token = await signToken("service_role", { expiresIn: 2 });
  const exp = decodeJwt(token).exp!;
  // a read, so that this test writes nothing the others count
  const first = await call(app, "GET", "/observability/audit", { token });
  assert.equal(first.status, 200, JSON.stringify(first.body));
  await new Promise((r) => setTimeout(r, exp * 1000 - Date.now() + 50));
  expectError(await call(app, "GET", "/observability/audit", { token }), 401, "token_expired");
});

dbTest("a token signed with another secret is 401", async () => {
  const token = await signToken("service_role", {
    secret: "another-secret-another-secret-another-secret",
  });
  expectError(await call(app, "POST", METRICS, { token, body: metric }), 401, "invalid_token");
});

dbTest("alg none is refused", async () => {
  const b64 = (o: unknown) =>
    btoa(JSON.stringify(o)).replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
  const token = `${b64({ alg: "none", typ: "JWT" })}.${
    b64({ role: "service_role", exp: 9999999999 })
  }.`;
  expectError(await call(app, "POST", METRICS, { token, body: metric }), 401, "invalid_token");
  assert.equal(await metricCount(), 0);
});

dbTest("a token with an unknown role or a user token without a uuid sub is 401", async () => {
  expectError(
    await call(app, "POST", METRICS, { token: await signToken("postgres"), body: metric }),
    401,
    "invalid_token",
  );
  expectError(
    await call(app, "POST", METRICS, {
      token: await signToken("authenticated", { sub: "admin" }),
      body: metric,
    }),
    401,
    "invalid_token",
  );
});

dbTest("a user token for another audience, or for none, is 401", async () => {
  const sub = crypto.randomUUID();
  for (const aud of ["some-other-project", ["api", "admin"], undefined]) {
    const err = expectError(
      await call(app, "GET", "/observability/audit", {
        token: await signToken("authenticated", { sub, extra: aud === undefined ? {} : { aud } }),
      }),
      401,
      "invalid_token",
    );
    assert.match(err.message, /audience/, JSON.stringify(aud));
  }
  // Supabase Auth's own form passes: an array holding "authenticated"
  const ok = await call(app, "GET", "/observability/audit", {
    token: await signToken("authenticated", { sub, extra: { aud: ["authenticated", "x"] } }),
  });
  assert.notEqual(ok.status, 401, JSON.stringify(ok.body));
});

dbTest("anon on a service route is 401; a user is 403; nothing is written", async () => {
  expectError(
    await call(app, "POST", METRICS, { token: await anonToken(), body: metric }),
    401,
    "login_required",
  );
  const uid = await createUser(db);
  expectError(
    await call(app, "POST", METRICS, { token: await userToken(uid), body: metric }),
    403,
    "forbidden",
  );
  assert.equal(await metricCount(), 0);
});

dbTest("malformed JSON is 400 invalid_json", async () => {
  const res = await call(app, "POST", METRICS, {
    token: await serviceToken(),
    body: '{"service_name":',
  });
  expectError(res, 400, "invalid_json");
});

// JSON.parse reads numbers as doubles: these would be stored as other numbers
// (1e309 as null), so they are refused; a double that spells them is kept.
dbTest("numbers JSON.parse would round are 400 inexact_number; exact ones are kept", async () => {
  const token = await serviceToken();
  const before = await metricCount();
  for (
    const [field, number] of [
      ["tags", "9007199254740993"],
      ["tags", "12345678901234567891"],
      ["tags", "1e309"],
      ["tags", "-1e400"],
      ["tags", "1e-400"],
      ["tags", "0.1000000000000000055511151231257827"],
      ["value", "1.0000000000000000001"],
    ]
  ) {
    const body = field === "tags"
      ? JSON.stringify({ ...metric, tags: { n: "N" } }).replace('"N"', number)
      : JSON.stringify({ ...metric, value: "N" }).replace('"N"', number);
    const err = expectError(
      await call(app, "POST", METRICS, { token, body }),
      400,
      "inexact_number",
    );
    assert.match(err.message, new RegExp(number.slice(0, 10).replace(".", "\\.")));
  }
  assert.equal(await metricCount(), before, "nothing written");

  const exact = '{"max_safe": 9007199254740991, "double": 0.30000000000000004, "big": 1.5e300, ' +
    '"tiny": 2.5e-300, "zeros": 1.50, "exp": 15E-1, "neg": -0.000123, ' +
    // doubles as %.17g and Java write them: the sender's double, kept
    '"g17": 0.10000000000000001, "java": 1.9999999999999998E23, "min": 4.9E-324}';
  const body = JSON.stringify({ ...metric, metric_name: "exact", tags: "T" }).replace('"T"', exact);
  const ok = await call(app, "POST", METRICS, { token, body });
  assert.equal(ok.status, 201, JSON.stringify(ok.body));
  const [row] = await db.sql`select tags::text as tags from public.system_metrics
                             where metric_name = 'exact'`;
  assert.deepEqual(JSON.parse(row.tags), JSON.parse(exact));
  assert.match(row.tags, /9007199254740991/);
  assert.match(row.tags, /0\.30000000000000004/);
  await db.sql`delete from public.system_metrics where metric_name = 'exact'`; // later tests count
});

dbTest(
  "a body that is not UTF-8 or holds a lone surrogate is 400, not stored altered",
  async () => {
    const token = await serviceToken();
    const before = await metricCount();
    const latin1 = new Uint8Array([
      ...new TextEncoder().encode(JSON.stringify({ ...metric, unit: "caf" }).slice(0, -2)),
      0xe9,
      ...new TextEncoder().encode('"}'),
    ]);
    const res = await app.request(METRICS, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: latin1,
    });
    assert.equal(res.status, 400);
    assert.equal((await res.json()).error.code, "invalid_json");
    for (
      const body of [
        JSON.stringify({ ...metric, unit: "x" }).replace('"x"', '"\\ud800x"'),
        JSON.stringify({ ...metric, tags: { k: "x" } }).replace('"x"', '"\\udfff"'),
        JSON.stringify({ ...metric, tags: { k: 1 } }).replace('"k"', '"\\ud83d"'),
      ]
    ) {
      const err = expectError(
        await call(app, "POST", METRICS, { token, body }),
        400,
        "invalid_json",
      );
      assert.match(err.message, /surrogate/, body);
    }
    assert.equal(await metricCount(), before, "nothing written");
    // a surrogate pair written as escapes is one character, and welcome
    const pair = JSON.stringify({ ...metric, metric_name: "pair", unit: "x" })
      .replace('"x"', '"\\ud83d\\ude00"');
    assert.equal((await call(app, "POST", METRICS, { token, body: pair })).status, 201);
    const [row] = await db.sql`delete from public.system_metrics where metric_name = 'pair'
                               returning unit`; // later tests count
    assert.equal(row.unit, "\u{1F600}");
  },
);

dbTest("schema violations are 400 with zod issues in details, and nothing is written", async () => {
  const res = await call(app, "POST", METRICS, {
    token: await serviceToken(),
    body: { ...metric, value: "fast", extra: 1 },
  });
  const err = expectError(res, 400, "invalid_request");
  assert.ok(Array.isArray(err.details) && err.details.length > 0, JSON.stringify(err));
  assert.equal(await metricCount(), 0);
});

dbTest("a repeated query parameter is 400, whichever value comes first", async () => {
  const token = await serviceToken();
  for (const query of ["limit=1&limit=abc", "limit=abc&limit=1", "limit=1&limit=2"]) {
    const err = expectError(
      await call(app, "GET", `/observability/audit?${query}`, { token }),
      400,
      "invalid_request",
    );
    assert.deepEqual(err.details, [{
      path: "limit",
      code: "repeated",
      message: "give this parameter once",
    }]);
  }
  assert.equal((await call(app, "GET", "/observability/audit?limit=1", { token })).status, 200);
});

dbTest("unknown routes are 404 in the error shape", async () => {
  const err = expectError(
    await call(app, "GET", "/observability/nope", { token: await serviceToken() }),
    404,
    "not_found",
  );
  assert.equal(err.details, null, "an error without details still has the key");
});

// supabase-js calls made with a `region` carry ?forceFunctionRegion= (and
// x-region): Supabase's gateway reads them; a strict query schema must not.
dbTest("the gateway's forceFunctionRegion parameter is not the function's input", async () => {
  const token = await serviceToken();
  const path = "/observability/metrics?service_name=api&metric_name=region_probe";
  const res = await call(app, "GET", `${path}&forceFunctionRegion=eu-west-3`, { token });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  // only that one: another key the schema does not know is still refused
  const other = expectError(
    await call(app, "GET", `${path}&region=eu-west-3`, { token }),
    400,
    "invalid_request",
  );
  assert.match(JSON.stringify(other.details), /region/);
});

/** The JSON log lines `body` writes at LOG_LEVEL=info (the suite runs silent). */
async function logsOf(body: () => Promise<void>): Promise<Record<string, unknown>[]> {
  Deno.env.set("LOG_LEVEL", "info");
  resetEnv();
  const lines: string[] = [];
  const original = console.log;
  console.log = (line: string) => lines.push(line);
  try {
    await body();
  } finally {
    console.log = original;
    Deno.env.set("LOG_LEVEL", "silent");
    resetEnv();
  }
  return lines.map((l) => JSON.parse(l));
}

// A client that goes away mid-body is its own fault, not a database error.
dbTest("a body that breaks off is 400 body_incomplete, logged as a request", async () => {
  const logged = await logsOf(async () => {
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode('{"service_name": "api", '));
        controller.error(new Error("connection reset"));
      },
    });
    const res = await app.request(METRICS, {
      method: "POST",
      headers: {
        authorization: `Bearer ${await serviceToken()}`,
        "content-type": "application/json",
      },
      body,
    });
    expectError({ status: res.status, body: await res.json() }, 400, "body_incomplete");
  });
  assert.deepEqual(
    logged.map((l) => `${l.level} ${l.msg} ${l.status}`),
    ["info request 400"],
    "no database error, no 500",
  );
});

dbTest("a known route with the wrong method is 405 with Allow", async () => {
  const res = await call(app, "DELETE", METRICS, { token: await serviceToken() });
  expectError(res, 405, "method_not_allowed");
  assert.match(res.headers.get("allow") ?? "", /GET/);
  assert.match(res.headers.get("allow") ?? "", /POST/);
});

dbTest("a body over the limit is 413, by Content-Length and by streamed size", async () => {
  const big = JSON.stringify({ ...metric, tags: { pad: "x".repeat(1024 * 1024 + 10) } });
  const token = await serviceToken();
  expectError(await call(app, "POST", METRICS, { token, body: big }), 413, "payload_too_large");

  const chunk = new TextEncoder().encode("x".repeat(64 * 1024));
  let sent = 0;
  const stream = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (sent++ > 40) controller.close();
      else controller.enqueue(chunk);
    },
  });
  const res = await app.request(METRICS, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: stream,
  });
  assert.equal(res.status, 413);
  assert.equal((await res.json()).error.code, "payload_too_large");
  assert.equal(await metricCount(), 0);
});

dbTest("x-correlation-id is echoed when valid and generated otherwise", async () => {
  const token = await serviceToken();
  const given = await call(app, "POST", METRICS, {
    token,
    body: metric,
    headers: { "x-correlation-id": "req-42.a" },
  });
  assert.equal(given.headers.get("x-correlation-id"), "req-42.a");
  const [row] = await db
    .sql`select correlation_id from public.system_metrics where id = ${given.body.id}`;
  assert.equal(row.correlation_id, "req-42.a");

  const generated = await call(app, "GET", "/observability/nope", { token });
  assert.match(generated.headers.get("x-correlation-id") ?? "", /^[0-9a-f-]{36}$/);
  assert.equal(generated.body.correlation_id, generated.headers.get("x-correlation-id"));

  const bad = await call(app, "GET", "/observability/nope", {
    token,
    headers: { "x-correlation-id": "a b<script>" },
  });
  // An unusable id is replaced by a generated one, echoed in the header and the body.
  assert.match(bad.headers.get("x-correlation-id") ?? "", /^[0-9a-f-]{36}$/);
  assert.equal(bad.body.correlation_id, bad.headers.get("x-correlation-id"));
});

dbTest("CORS preflight is answered without credentials", async () => {
  const res = await app.request(METRICS, {
    method: "OPTIONS",
    headers: {
      origin: "https://app.easymo.rw",
      "access-control-request-method": "POST",
      "access-control-request-headers":
        "authorization, content-type, x-client-info, apikey, x-region",
    },
  });
  assert.equal(res.status, 204);
  assert.equal(res.headers.get("access-control-allow-origin"), "*");
  assert.match(res.headers.get("access-control-allow-headers") ?? "", /authorization/);
  assert.match(res.headers.get("access-control-allow-headers") ?? "", /x-region/);
  assert.match(res.headers.get("access-control-allow-methods") ?? "", /POST/);
  // and a browser may read the replay marker, the request id and a 503's Retry-After
  const answer = await app.request(METRICS, { headers: { origin: "https://app.easymo.rw" } });
  const exposed = (answer.headers.get("access-control-expose-headers") ?? "").split(",");
  assert.deepEqual(
    exposed.map((h) => h.trim()).sort(),
    ["idempotent-replayed", "retry-after", "x-correlation-id"],
  );
});

dbTest("one JSON log line per request, with no token in it", async () => {
  const token = await serviceToken();
  const logged = await logsOf(async () => {
    await call(app, "POST", METRICS, {
      token,
      body: metric,
      headers: { "x-correlation-id": "log-check" },
    });
  });
  const entries = logged.filter((e) => e.msg === "request");
  assert.equal(entries.length, 1);
  const [entry] = entries;
  assert.equal(entry.method, "POST");
  assert.equal(entry.path, METRICS);
  assert.equal(entry.status, 201);
  assert.equal(entry.correlation_id, "log-check");
  assert.equal(typeof entry.duration_ms, "number");
  assert.ok(!JSON.stringify(logged).includes(token), "the token must not be logged");
});

dbTest(
  "Supabase API keys: a secret key is the service role, a publishable key is anon, others 401",
  async () => {
    const secret = `sb_secret_${crypto.randomUUID()}`;
    const publishable = `sb_publishable_${crypto.randomUUID()}`;
    Deno.env.set("SUPABASE_SECRET_KEYS", JSON.stringify({ default: secret }));
    Deno.env.set("SUPABASE_PUBLISHABLE_KEYS", JSON.stringify({ default: publishable }));
    resetEnv();
    resetAuth();
    try {
      const before = await metricCount();
      const ok = await call(app, "POST", METRICS, { token: secret, body: metric });
      assert.equal(ok.status, 201, JSON.stringify(ok.body));
      assert.equal(await metricCount(), before + 1);
      // anon may not record metrics: told to sign in, not let through
      expectError(
        await call(app, "POST", METRICS, { token: publishable, body: metric }),
        401,
        "login_required",
      );
      for (
        const forged of [
          `sb_secret_${crypto.randomUUID()}`,
          secret.slice(0, -1),
          `${secret}x`,
          publishable.replace("sb_publishable_", "sb_secret_"),
        ]
      ) {
        expectError(
          await call(app, "POST", METRICS, { token: forged, body: metric }),
          401,
          "invalid_token",
        );
      }
      assert.equal(await metricCount(), before + 1);
    } finally {
      Deno.env.delete("SUPABASE_SECRET_KEYS");
      Deno.env.delete("SUPABASE_PUBLISHABLE_KEYS");
      resetEnv();
      resetAuth();
    }
    // without the variables an API key is no key at all
    expectError(await call(app, "POST", METRICS, { token: secret, body: metric }), 401);
  },
);

dbTest(
  "asymmetric keys: a token verified against SUPABASE_JWKS is accepted, a foreign key is not",
  async () => {
    const { publicKey, privateKey } = await generateKeyPair("ES256");
    const other = await generateKeyPair("ES256");
    const jwk = { ...(await exportJWK(publicKey)), kid: "k1", alg: "ES256", use: "sig" };
    Deno.env.set("SUPABASE_JWKS", JSON.stringify({ keys: [jwk] }));
    resetEnv();
    resetAuth();
    const sign = (key: Parameters<SignJWT["sign"]>[0]) =>
      new SignJWT({ role: "service_role" })
        .setProtectedHeader({ alg: "ES256", kid: "k1" })
        .setExpirationTime("5m")
        .sign(key);
    try {
      const ok = await call(app, "POST", METRICS, { token: await sign(privateKey), body: metric });
      assert.equal(ok.status, 201, JSON.stringify(ok.body));
      const forged = await call(app, "POST", METRICS, {
        token: await sign(other.privateKey),
        body: metric,
      });
      expectError(forged, 401, "invalid_token");
    } finally {
      Deno.env.delete("SUPABASE_JWKS");
      resetEnv();
      resetAuth();
    }
  },
);

dbTest(
  "JWKS_URL down, failing or not a key set is 503 auth_unavailable; the token passes once it answers",
  async () => {
    const { publicKey, privateKey } = await generateKeyPair("ES256");
    const jwk = { ...(await exportJWK(publicKey)), kid: "k1", alg: "ES256", use: "sig" };
    let answer = () => new Response("upstream failed", { status: 500 });
    const server = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, () => answer());
    const token = await new SignJWT({ role: "service_role" })
      .setProtectedHeader({ alg: "ES256", kid: "k1" })
      .setExpirationTime("5m")
      .sign(privateKey);
    const useJwksUrl = (url: string) => {
      Deno.env.set("JWKS_URL", url);
      resetEnv();
      resetAuth();
    };
    try {
      // nothing listens on port 1
      useJwksUrl("http://127.0.0.1:1/jwks");
      const down = await call(app, "POST", METRICS, { token, body: metric });
      expectError(down, 503, "auth_unavailable");
      assert.equal(down.headers.get("retry-after"), "1", "a 503 to retry says when");
      useJwksUrl(`http://127.0.0.1:${server.addr.port}/jwks`);
      expectError(
        await call(app, "POST", METRICS, { token, body: metric }),
        503,
        "auth_unavailable",
      );
      answer = () => Response.json({ no: "keys" });
      expectError(
        await call(app, "POST", METRICS, { token, body: metric }),
        503,
        "auth_unavailable",
      );
      // the same key set, fetched again now that it answers
      answer = () => Response.json({ keys: [jwk] });
      const ok = await call(app, "POST", METRICS, { token, body: metric });
      assert.equal(ok.status, 201, JSON.stringify(ok.body));
      // a token the keys do not verify is still the token's fault
      const other = await generateKeyPair("ES256");
      const forged = await new SignJWT({ role: "service_role" })
        .setProtectedHeader({ alg: "ES256", kid: "k1" })
        .setExpirationTime("5m")
        .sign(other.privateKey);
      expectError(await call(app, "POST", METRICS, { token: forged, body: metric }), 401);
    } finally {
      await server.shutdown();
      Deno.env.delete("JWKS_URL");
      resetEnv();
      resetAuth();
    }
  },
);
