// shared/db.ts: claims reach SQL exactly as PostgREST sets them, values in
// rpc() cannot break out of their literals, and failures leave nothing behind.
import assert from "node:assert/strict";
import { db as dbPool, rpc, TextArray, toHttpError, withClaims } from "../../shared/db.ts";
import type { Principal } from "../../shared/auth.ts";
import { HttpError } from "../../shared/errors.ts";
import { resetEnv } from "../../shared/env.ts";
import { createUser, dbTest, freshDatabase } from "../support/harness.ts";

const db = await freshDatabase();
const service: Principal = { role: "service_role", claims: { role: "service_role" } };

/** assert.rejects' check: an HttpError with this status and code (and SQLSTATE, when given). */
const httpError = (status: number, code: string, sqlstate?: string) => (e: unknown) =>
  e instanceof HttpError && e.status === status && e.code === code &&
  (sqlstate === undefined || (e.details as { sqlstate?: string }).sqlstate === sqlstate);

/** log_audit_event's required fields, plus what a test sets. */
const audit = (extra: Record<string, unknown>) => ({
  actor_type: "service",
  actor_identifier: "svc",
  ...extra,
});

/**
 * Asserts that the pool's connections carry no role, claims or correlation id
 * left over from earlier requests. It asks through the raw pool, which sets
 * nothing itself, so a leaked setting is what it would see.
 */
async function assertPoolClean(): Promise<void> {
  const after = await Promise.all(
    Array.from(
      { length: 8 },
      () =>
        dbPool()`select current_user as role,
                        coalesce(current_setting('request.jwt.claims', true), '') as claims,
                        coalesce(current_setting('request.correlation_id', true), '') as correlation_id`,
    ),
  );
  for (const [row] of after) {
    assert.equal(row.role, "postgres");
    assert.equal(row.claims, "");
    assert.equal(row.correlation_id, "");
  }
}

const nasty = [
  "it's",
  "$$ dollar $$",
  "$q12345678$ tag-like $q12345678$",
  "$v$ the fixed tag $v$",
  "ends with half the tag $v",
  "back\\slash \\' ",
  "'); drop table public.system_audit_logs; --",
  "Murakaza neza 🇷🇼 — ñ",
];

dbTest("withClaims runs as the token's role with its claims", async () => {
  const uid = await createUser(db);
  const who: Principal = {
    role: "authenticated",
    userId: uid,
    claims: { role: "authenticated", sub: uid, user_metadata: { name: nasty[4] } },
  };
  const [row] = await withClaims(
    who,
    "corr-1",
    (tx) =>
      tx`select current_user as role, auth.uid() as uid, auth.jwt() -> 'user_metadata' ->> 'name' as name,
              current_setting('request.correlation_id') as correlation_id`,
  );
  assert.equal(row.role, "authenticated");
  assert.equal(row.uid, uid);
  assert.equal(row.name, nasty[4]);
  assert.equal(row.correlation_id, "corr-1");
});

dbTest("settings are transaction-local: the next use of the connection is clean", async () => {
  const uid = await createUser(db);
  const who: Principal = {
    role: "authenticated",
    userId: uid,
    claims: { role: "authenticated", sub: uid },
  };
  // More at once than the pool has connections, so every connection is used.
  const rows = await Promise.all(
    Array.from(
      { length: 8 },
      () => withClaims(who, "a", (tx) => tx`select current_user as role, auth.uid() as uid`),
    ),
  );
  for (const [row] of rows) assert.deepEqual(row, { role: "authenticated", uid });
  await assertPoolClean();
});

dbTest("rpc values cannot escape their literals", async () => {
  for (const text of nasty) {
    const [row] = await rpc(service, "c", "public.log_audit_event", {
      actor_type: "service",
      actor_identifier: "svc",
      action: "quoted",
      error_message: text,
    });
    const [stored] = await db.sql`select error_message from public.system_audit_logs
                                  where id = ${row.log_audit_event as string}`;
    assert.equal(stored.error_message, text);
  }
  const [{ n }] = await db.sql`select count(*)::int as n from public.system_audit_logs`;
  assert.equal(n, nasty.length);
});

dbTest("text arrays reach text[] parameters element for element", async () => {
  await db.sql`create function public.echo_texts(p_items text[])
               returns table (item text) language sql as $$ select unnest(p_items) $$`;
  await db.sql`grant execute on function public.echo_texts(text[]) to service_role`;
  const items = ['a"b', "c\\d", "e,f", "{g}", "NULL", "", "$v$ 🇷🇼"];
  const rows = await rpc(service, "c", "public.echo_texts", { items: new TextArray(items) });
  assert.deepEqual(rows.map((r) => r.item), items);
  await assert.rejects(
    rpc(service, "c", "public.echo_texts", { items: new TextArray(["a\u0000"]) }),
    /NUL/,
  );
});

dbTest("rpc takes only schema-qualified function names and plain parameter names", async () => {
  for (
    const fn of [
      "record_metric",
      "public.record_metric.x",
      "public.Record",
      "a.b;c",
      "public.x; drop table y",
    ]
  ) {
    await assert.rejects(rpc(service, "c", fn), /not a schema-qualified/);
  }
  await assert.rejects(
    rpc(service, "c", "public.record_metric", { "a) ; --": 1 }),
    /not a parameter/,
  );
  await assert.rejects(
    rpc(service, "c", "public.get_job", { job_id: 1 }, { columns: ["id; drop table x"] }),
    /not a column name/,
  );
});

dbTest("rpc can select only the columns a caller reads", async () => {
  const [job] = await rpc(service, "s", "public.schedule_job", {
    job_type: "narrow",
    job_name: "columns",
  }, { columns: ["id", "status"] });
  assert.deepEqual(Object.keys(job).sort(), ["id", "status"]);
  assert.equal(job.status, "pending");
});

dbTest("an rpc given a time limit is a 503 then, and the database ends the call too", async () => {
  await db.sql`create function public.test_sleep(p_seconds double precision) returns void
               language sql as $$ select pg_sleep(p_seconds) $$`;
  await db.sql`grant execute on function public.test_sleep(double precision) to service_role`;
  const sleeping = async () =>
    (await db.sql`select count(*)::int as n from pg_stat_activity
                  where datname = current_database() and pid <> pg_backend_pid()
                    and state = 'active' and query like '%public.test_sleep(%'`)[0].n;
  const started = performance.now();
  const call = rpc(service, "limited", "public.test_sleep", { seconds: 5 }, "*", 400);
  await new Promise((r) => setTimeout(r, 150));
  assert.equal(await sleeping(), 1, "the call is running");
  await assert.rejects(call, httpError(503, "deadline_exceeded"));
  const ms = performance.now() - started;
  assert.ok(ms >= 390 && ms < 1500, `cut off after ${ms.toFixed(0)} ms`);
  // the database's own timeout is the same limit: it does not sleep on
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(await sleeping(), 0, "the database ended the call");
  // no time left: nothing is sent
  await assert.rejects(
    rpc(service, "none", "public.test_sleep", { seconds: 0 }, "*", 0),
    httpError(503, "deadline_exceeded"),
  );
  // a limit longer than the call changes nothing
  assert.deepEqual(
    [...await rpc(service, "roomy", "public.test_sleep", { seconds: 0.01 }, "*", 5_000)],
    [{ test_sleep: "" }],
  );
});

// A call cut off while it waited for a connection was sent once it got one,
// with a 1 ms statement timeout, and a quick write committed after its
// caller had been told 503. A limit past what a timer can hold (2^31 ms)
// cut the call off at once.
dbTest("an rpc cut off while it waits for a connection is never sent", async () => {
  await db.sql`create or replace function public.test_sleep(p_seconds double precision)
               returns void language sql as $$ select pg_sleep(p_seconds) $$`;
  await db.sql`grant execute on function public.test_sleep(double precision) to service_role`;
  Deno.env.set("DB_POOL_SIZE", "1");
  resetEnv();
  try {
    const busy = rpc(service, "busy", "public.test_sleep", { seconds: 0.6 });
    const late = (n: number) =>
      rpc(
        service,
        "late",
        "public.record_metric",
        {
          service_name: "api",
          metric_type: "gauge",
          metric_name: `late-${n}`,
          value: n,
        },
        "*",
        100,
      );
    const outcomes = await Promise.allSettled([late(1), late(2), late(3)]);
    for (const o of outcomes) {
      assert.ok(o.status === "rejected" && httpError(503, "deadline_exceeded")(o.reason));
    }
    await busy;
    await new Promise((r) => setTimeout(r, 300));
    const [{ n }] = await db.sql`select count(*)::int as n from public.system_metrics
                                 where metric_name like 'late-%'`;
    assert.equal(n, 0, "nothing cut off was written");
    // no timer overflow: a limit of 2^31 ms or more is no limit
    for (const limit of [2 ** 31, 3e9, Infinity]) {
      await rpc(service, "long", "public.test_sleep", { seconds: 0.05 }, "*", limit);
    }
  } finally {
    Deno.env.delete("DB_POOL_SIZE");
    resetEnv();
  }
});

dbTest("a failing rpc writes nothing and the pool stays usable", async () => {
  const bad = [{ service_name: "api", metric_type: "gauge", metric_name: "q", value: 1 }, {
    service_name: "api",
  }];
  await assert.rejects(
    rpc(service, "d", "public.record_metrics", { metrics: bad }),
    httpError(400, "invalid_input"),
  );
  const [{ n }] = await db.sql`select count(*)::int as n from public.system_metrics`;
  assert.equal(n, 0);
  await Promise.all(
    Array.from({ length: 10 }, (_, i) =>
      rpc(service, "e", "public.record_metric", {
        service_name: "api",
        metric_type: "gauge",
        metric_name: "after",
        value: i,
      })),
  );
  const [after] = await db.sql`select count(*)::int as n, sum(value)::int as s
                               from public.system_metrics where metric_name = 'after'`;
  assert.deepEqual(after, { n: 10, s: 45 });
});

dbTest("domain errors keep their status and code; NUL bytes are a 400, not a 500", async () => {
  await assert.rejects(
    rpc(service, "f", "public.record_metric", {
      service_name: "api",
      metric_type: "gauge",
      metric_name: "x",
      value: 1,
      tags: [1, 2],
    }),
    httpError(400, "invalid_tags"),
  );
  await assert.rejects(
    rpc(
      service,
      "g",
      "public.log_audit_event",
      audit({ action: "nul", error_message: "a\u0000b" }),
    ),
    httpError(400, "invalid_text"),
  );
});

dbTest("bad values are a 400; other data exceptions are our fault, a 500", async () => {
  await assert.rejects(
    rpc(
      service,
      "j",
      "public.log_audit_event",
      audit({ action: "bad_uuid", user_id: "not-a-uuid" }),
    ),
    httpError(400, "invalid_input", "22P02"),
  );
  await assert.rejects(
    withClaims(service, "k", (tx) => tx`select 1 / 0 as x`),
    httpError(500, "internal_error"),
  );
});

dbTest("rpc's settings end with its message: pooled connections come back clean", async () => {
  const uid = await createUser(db);
  const who: Principal = {
    role: "authenticated",
    userId: uid,
    claims: { role: "authenticated", sub: uid },
  };
  await Promise.all(
    Array.from(
      { length: 8 },
      () =>
        rpc(who, "i", "public.log_audit_event", {
          actor_type: "user",
          actor_identifier: uid,
          action: "clean",
        }),
    ),
  );
  await assertPoolClean();
});

// When the database dies mid-query, postgres.js drops the closed socket's
// listeners and Deno's node:net can still reject for it (read ECONNRESET,
// connect ECONNREFUSED): nobody can catch that, and it ended the whole
// process (a stack under load lost its API when Postgres was killed: 3 runs
// in 6). The pool drops those orphans; any other unhandled rejection still
// ends the process. A child process, as an uncaught rejection ends it.
async function childWithUnhandled(code: string): Promise<{ status: number; out: string }> {
  const dbModule = new URL("../../shared/db.ts", import.meta.url).href;
  const script = `
    import { db } from ${JSON.stringify(dbModule)};
    db();
    Promise.reject(Object.assign(new Error("orphan"), { code: ${JSON.stringify(code)} }));
    await new Promise((r) => setTimeout(r, 200));
    console.log("alive");`;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--ext=ts", script],
    env: { SUPABASE_DB_URL: db.url, LOG_LEVEL: "silent" },
    stdout: "piped",
    stderr: "null",
  }).output();
  return { status: out.code, out: new TextDecoder().decode(out.stdout).trim() };
}

dbTest("an orphan socket error from a dead database does not end the process", async () => {
  for (const code of ["ECONNRESET", "ECONNREFUSED", "EPIPE"]) {
    assert.deepEqual(await childWithUnhandled(code), { status: 0, out: "alive" }, code);
  }
  const other = await childWithUnhandled("ERR_SOMETHING_ELSE");
  assert.notEqual(other.status, 0, "an unrelated unhandled rejection still ends the process");
  assert.equal(other.out, "");
});

// With the database down, postgres.js fails queued queries one per failed
// connection attempt, and its backoff between attempts grows to 20 s:
// requests failed one by one for minutes, and the pool came back up to 20 s
// after the database did. The backoff stops at 1 s now, so 32 waiting
// requests fail within seconds (the child lifts DB_ACQUIRE_TIMEOUT_MS, so
// that none of them is refused as busy first). A child process: the database
// is a port where nothing listens, then a proxy to the test database opens
// there.
dbTest(
  "with the database down requests fail fast as 503, and the pool is back at once after",
  async () => {
    const free = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (free.addr as Deno.NetAddr).port;
    free.close();
    const target = new URL(db.url);
    const dbModule = new URL("../../shared/db.ts", import.meta.url).href;
    const script = `
    import { rpc, withClaims } from ${JSON.stringify(dbModule)};
    const who = { role: "service_role", claims: { role: "service_role" } };
    const call = () => rpc(who, "c", "public.queue_metrics", { queue_name: "q" });
    let started = performance.now();
    const outcome = (p) => p.then(() => "ok", (e) => e.status + " " + e.code);
    const outcomes = await Promise.all([
      ...Array.from({ length: 30 }, () => outcome(call())),
      ...Array.from({ length: 2 }, () => outcome(withClaims(who, "w", (tx) => tx\`select 1\`))),
    ]);
    const downMs = performance.now() - started;
    // the database comes back: a proxy to it on the same port
    const proxy = Deno.listen({ hostname: "127.0.0.1", port: ${port} });
    (async () => {
      for await (const conn of proxy) {
        const up = await Deno.connect({ hostname: "127.0.0.1", port: ${Number(target.port)} });
        conn.readable.pipeTo(up.writable).catch(() => {});
        up.readable.pipeTo(conn.writable).catch(() => {});
      }
    })();
    started = performance.now();
    let backMs = null;
    while (backMs === null && performance.now() - started < 30000) {
      if ((await outcome(call())) === "ok") backMs = performance.now() - started;
      else await new Promise((r) => setTimeout(r, 50));
    }
    console.log(JSON.stringify({ outcomes: [...new Set(outcomes)], downMs, backMs }));
    Deno.exit(0);`;
    const url = new URL(db.url);
    url.port = String(port);
    const child = new Deno.Command(Deno.execPath(), {
      args: ["eval", "--ext=ts", "--no-check", script],
      // waiting for a connection unbounded here: this test is about failing connections
      env: { SUPABASE_DB_URL: url.href, LOG_LEVEL: "silent", DB_ACQUIRE_TIMEOUT_MS: "60000" },
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const killer = setTimeout(() => child.kill("SIGKILL"), 60_000);
    const out = await child.output();
    clearTimeout(killer);
    const text = new TextDecoder().decode(out.stdout).trim();
    assert.ok(text, "the child was still waiting after 60 s");
    const { outcomes, downMs, backMs } = JSON.parse(text);
    assert.deepEqual(outcomes, ["503 database_unavailable"]);
    assert.ok(downMs < 15_000, `the last of 32 requests failed after ${downMs} ms`);
    assert.ok(backMs !== null && backMs < 3000, `the pool served again after ${backMs} ms`);
  },
);

// A saturated pool: requests wait their turn for a connection, but not
// forever. With one connection held by a slow transaction, a request that
// waits past DB_ACQUIRE_TIMEOUT_MS is 503 database_busy without having sent
// anything, and the ones queued after it still get the connection in turn.
dbTest(
  "a request that waits too long for a connection is 503 database_busy and sends nothing",
  async () => {
    const dbModule = new URL("../../shared/db.ts", import.meta.url).href;
    const script = `
    import { rpc, withClaims } from ${JSON.stringify(dbModule)};
    const who = { role: "service_role", claims: { role: "service_role" } };
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const outcome = (p) => p.then((v) => "ok " + v, (e) =>
      e.status + " " + e.code + " retry-after " + e.headers?.["retry-after"]);
    const t0 = performance.now();
    let busyRan = false;
    let open;
    const gate = new Promise((r) => open = r);
    const slow = outcome(withClaims(who, "slow", async (tx) => {
      await tx\`select 1\`;
      await gate; // holds the only connection until the others are queued
      return "slow";
    }));
    await sleep(50);
    const busy = outcome(withClaims(who, "busy", (tx) => {
      busyRan = true;
      return tx\`select 1\`;
    })).then((o) => [o, Math.round(performance.now() - t0)]);
    const busyRpc = outcome(rpc(who, "busy-rpc", "public.queue_metrics", { queue_name: "q" }));
    await sleep(750); // busy has been refused; these queue behind the slow one
    const next = outcome(rpc(who, "next", "public.queue_metrics", { queue_name: "q" })
      .then(() => "rpc"));
    const last = outcome(withClaims(who, "last", (tx) => tx\`select 'last' as v\`)
      .then((rows) => rows[0].v));
    open();
    console.log(JSON.stringify({
      slow: await slow, busy: await busy, busyRan, busyRpc: await busyRpc, next: await next,
      last: await last,
    }));
    Deno.exit(0);`;
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--ext=ts", "--no-check", script],
      env: {
        SUPABASE_DB_URL: db.url,
        LOG_LEVEL: "silent",
        DB_POOL_SIZE: "1",
        DB_ACQUIRE_TIMEOUT_MS: "600",
      },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout).trim();
    assert.ok(text, new TextDecoder().decode(out.stderr));
    const { slow, busy, busyRan, busyRpc, next, last } = JSON.parse(text);
    assert.equal(slow, "ok slow");
    assert.equal(busy[0], "503 database_busy retry-after 1");
    assert.ok(
      busy[1] >= 640 && busy[1] < 1000,
      `refused after ${busy[1]} ms, while the slow one ran`,
    );
    assert.equal(busyRan, false, "the refused request sent nothing");
    assert.equal(busyRpc, "503 database_busy retry-after 1", "an rpc() waits its turn too");
    assert.equal(next, "ok rpc");
    assert.equal(last, "ok last");
  },
);

dbTest("a database that cannot be reached is a 503 to retry, not a 500", () => {
  for (const code of ["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH"]) {
    const e = toHttpError(Object.assign(new Error(code), { code }));
    assert.deepEqual(
      [e.status, e.code, e.headers?.["retry-after"]],
      [503, "database_unavailable", "1"],
      code,
    );
  }
  return Promise.resolve();
});

dbTest("every 503 the database causes tells the client when to retry", () => {
  const cases = [
    ["57014", "timeout"],
    ["40001", "contention"],
    ["40P01", "contention"],
    ["08006", "database_unavailable"],
    ["57P01", "database_unavailable"],
  ];
  for (const [sqlstate, code] of cases) {
    const e = toHttpError(Object.assign(new Error(sqlstate), { code: sqlstate }));
    assert.deepEqual([e.status, e.code, e.headers?.["retry-after"]], [503, code, "1"], sqlstate);
  }
  // a fault or bad input is not one to send again unchanged
  for (const sqlstate of ["23505", "22P02", "XX000"]) {
    const e = toHttpError(Object.assign(new Error(sqlstate), { code: sqlstate }));
    assert.equal(e.headers?.["retry-after"], undefined, sqlstate);
  }
  return Promise.resolve();
});

/**
 * Runs `script` in a child process (`env` added to its environment) and
 * returns the JSON it prints: the child can end in ways this process must
 * not. Killed after `limitMs`.
 */
async function childResult(
  script: string,
  env: Record<string, string>,
  limitMs: number,
): Promise<unknown> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", "--ext=ts", "--no-check", script],
    env: { LOG_LEVEL: "silent", JWT_SECRET: "x".repeat(40), ...env },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const killer = setTimeout(() => child.kill("SIGKILL"), limitMs);
  const out = await child.output();
  clearTimeout(killer);
  const text = new TextDecoder().decode(out.stdout).trim();
  assert.ok(text, `the child ended: ${new TextDecoder().decode(out.stderr).slice(0, 2000)}`);
  return JSON.parse(text);
}

// A backend that ends under a request (pg_terminate_backend, a failover)
// ended the whole process twice over: withClaims sent its rollback on the
// dead connection and released it among the open ones, and postgres.js wrote
// to the socket it had dropped, a TypeError nothing can catch; and a backend
// ended while postgres.js fetched array types on a new connection rejected
// that internal query with nothing awaiting it. A child process, as either
// ends it: the database is behind a proxy that ends the backend the first
// time it sees the type fetch, and a withClaims transaction's backend is
// ended mid-statement. Both requests are 503; the pool serves the next ones.
dbTest("a backend ended under a request is a 503, and the process and pool live on", async () => {
  const dbModule = new URL("../../shared/db.ts", import.meta.url).href;
  const target = new URL(db.url);
  const script = `
    import postgres from "postgres";
    import { rpc, withClaims } from ${JSON.stringify(dbModule)};
    const admin = postgres(${JSON.stringify(db.url)}, { max: 1, onnotice: () => {} });
    const endBackends = () => admin\`select pg_terminate_backend(pid) from pg_stat_activity
      where application_name = 'easymo-functions' and datname = current_database()\`;
    let typeFetchesEnded = 0;
    const proxy = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    (async () => {
      for await (const client of proxy) {
        const server = await Deno.connect({ hostname: "127.0.0.1", port: ${Number(target.port)} });
        server.readable.pipeTo(client.writable).catch(() => {});
        client.readable.pipeThrough(new TransformStream({
          async transform(chunk, out) {
            if (typeFetchesEnded === 0 && new TextDecoder().decode(chunk).includes("typcategory")) {
              typeFetchesEnded++;
              await endBackends();
            }
            out.enqueue(chunk);
          },
        })).pipeTo(server.writable).catch(() => {});
      }
    })();
    const url = new URL(${JSON.stringify(db.url)});
    url.port = String(proxy.addr.port);
    Deno.env.set("SUPABASE_DB_URL", url.href);
    const who = { role: "service_role", claims: { role: "service_role" } };
    const outcome = (p) => p.then(() => "ok", (e) => e.status + " " + e.code);
    const call = () => outcome(rpc(who, "c", "public.queue_metrics", { queue_name: "q" }));
    const typeFetch = await call();
    const sleeping = outcome(withClaims(who, "w", (tx) => tx\`select pg_sleep(5)\`));
    await new Promise((r) => setTimeout(r, 300));
    await endBackends();
    const midTransaction = await sleeping;
    await new Promise((r) => setTimeout(r, 300));
    const after = await Promise.all([
      call(), call(), outcome(withClaims(who, "w", (tx) => tx\`select 1\`)),
    ]);
    console.log(JSON.stringify({ typeFetchesEnded, typeFetch, midTransaction, after }));
    await admin.end();
    Deno.exit(0);`;
  assert.deepEqual(await childResult(script, {}, 60_000), {
    typeFetchesEnded: 1,
    typeFetch: "503 database_unavailable",
    midTransaction: "503 database_unavailable",
    after: ["ok", "ok", "ok"],
  });
});

/**
 * A child script around `body`: rpc and withClaims of shared/db.ts on the
 * test database (warmed up), `endBackends()` to end their backends, `who`
 * (the service role), `outcome(p)` ("ok", "ok <n>" for a number, or
 * "<status> <code>") and `sleep(ms)`.
 */
function endingBackends(body: string): string {
  const dbModule = new URL("../../shared/db.ts", import.meta.url).href;
  return `
    import postgres from "postgres";
    import { rpc, withClaims } from ${JSON.stringify(dbModule)};
    const admin = postgres(${JSON.stringify(db.url)}, { max: 1, onnotice: () => {} });
    const endBackends = () => admin\`select pg_terminate_backend(pid) from pg_stat_activity
      where application_name = 'easymo-functions' and datname = current_database()\`;
    const who = { role: "service_role", claims: { role: "service_role" } };
    const outcome = (p) => p.then((v) => typeof v === "number" ? "ok " + v : "ok",
      (e) => e.status + " " + e.code);
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    await rpc(who, "warm", "public.queue_metrics", { queue_name: "q" });
    ${body}
    await admin.end();
    Deno.exit(0);`;
}

// A backend ended while a withClaims callback waited between its queries, or
// before its COMMIT, ended the process: postgres.js wrote the next query to
// the socket it had dropped. The transaction is now a 503, writes nothing,
// and the process and pool live on.
dbTest("a backend ended between a transaction's queries is a 503 and writes nothing", async () => {
  const script = endingBackends(`
    const metric = (tx, name) => tx\`select public.record_metric(p_service_name := 'api',
      p_metric_type := 'gauge', p_metric_name := \${name}, p_value := 1)\`;
    const ended = [];
    for (const [name, between] of [["hold-between", true], ["hold-before-commit", false]]) {
      const tx = outcome(withClaims(who, name, async (tx) => {
        await metric(tx, name);
        await sleep(400);
        if (between) await metric(tx, name + "-2");
      }));
      await sleep(150);
      await endBackends();
      ended.push(await tx);
    }
    await sleep(300);
    const after = await Promise.all([
      outcome(rpc(who, "c", "public.queue_metrics", { queue_name: "q" })),
      outcome(withClaims(who, "w", (tx) => metric(tx, "hold-after"))),
    ]);
    const kept = (await admin\`select metric_name from public.system_metrics
                                where metric_name like 'hold-%'\`).map((r) => r.metric_name);
    console.log(JSON.stringify({ ended, after, kept }));`);
  assert.deepEqual(await childResult(script, { SUPABASE_DB_URL: db.url }, 60_000), {
    ended: ["503 database_unavailable", "503 database_unavailable"],
    after: ["ok", "ok"],
    kept: ["hold-after"],
  });
  await db.sql`delete from public.system_metrics where metric_name like 'hold-%'`;
});

// A callback cursor's next fetch is sent by postgres.js itself once the
// callback returns, past the check before each query: a backend ended while
// the callback ran crashed the process the same way.
dbTest("a backend ended while a cursor's callback runs is a 503, not a crash", async () => {
  const script = endingBackends(`
    const fetches = (pause) => outcome(withClaims(who, "cur", async (tx) => {
      let n = 0;
      await tx\`select g from generate_series(1, 100) g\`.cursor(10, async (rows) => {
        n += rows.length;
        await sleep(pause);
      });
      return n;
    }));
    const ended = fetches(400);
    await sleep(150);
    await endBackends();
    const first = await ended;
    await sleep(300);
    const after = await fetches(0);
    // a callback that throws on the last batch (which postgres.js does not
    // await) still fails the query, not the process
    const thrown = await outcome(withClaims(who, "cur", async (tx) => {
      let n = 0;
      await tx\`select g from generate_series(1, 25) g\`.cursor(10, (rows) => {
        n += rows.length;
        if (n > 20) throw new Error("boom");
      });
      return n;
    }));
    console.log(JSON.stringify({ first, after, thrown }));`);
  assert.deepEqual(await childResult(script, { SUPABASE_DB_URL: db.url }, 60_000), {
    first: "503 database_unavailable",
    after: "ok 100",
    thrown: "500 internal_error",
  });
});

// postgres.js can lose a request when connections die around it: a
// reserve() handed to a reconnect was forgotten, and a connection handed to a
// reserve() that had already failed was stranded. Requests then waited
// forever holding their slots, and once all were held every later request
// was 503 database_busy for good. A child process runs six clients of rpc()
// and withClaims() (some rolling back) for 6 s while half its backends are
// ended every 40 ms or so (those behind its own proxy, found by port): every
// request is answered within the operation timeout, and afterwards the pool
// serves again.
dbTest(
  "requests under backends ended at random are all answered, and the pool recovers",
  async () => {
    const dbModule = new URL("../../shared/db.ts", import.meta.url).href;
    const target = new URL(db.url);
    const script = `
    import postgres from "postgres";
    import { rpc, withClaims } from ${JSON.stringify(dbModule)};
    const admin = postgres(${JSON.stringify(db.url)}, { max: 1, onnotice: () => {} });
    const ports = new Set();
    const proxy = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    (async () => {
      for await (const client of proxy) {
        const server = await Deno.connect({ hostname: "127.0.0.1", port: ${Number(target.port)} });
        ports.add(server.localAddr.port);
        server.readable.pipeTo(client.writable).catch(() => {});
        client.readable.pipeTo(server.writable).catch(() => {});
      }
    })();
    const url = new URL(${JSON.stringify(db.url)});
    url.port = String(proxy.addr.port);
    Deno.env.set("SUPABASE_DB_URL", url.href);
    const who = { role: "service_role", claims: { role: "service_role" } };
    const outcome = (p) => p.then(() => "ok", (e) => e.status + " " + e.code);
    const audit = { actor_type: "service", actor_identifier: "svc", action: "fuzz" };
    let stop = false;
    const unanswered = [];
    const client = async () => {
      for (let n = 0; !stop; n++) {
        const op = [
          () => rpc(who, "r", "public.log_audit_event", audit),
          () => withClaims(who, "w", async (tx) => { await tx\`select 1\`; await tx\`select pg_sleep(0.005)\`; }),
          () => withClaims(who, "w", async (tx) => { await tx\`select 1\`; await tx\`select 1 / 0\`; }),
        ][n % 3];
        const answer = await Promise.race([
          outcome(op()),
          new Promise((r) => setTimeout(() => r("unanswered"), 10000)),
        ]);
        if (answer === "unanswered") unanswered.push(n % 3);
      }
    };
    const killer = async () => {
      while (!stop) {
        await new Promise((r) => setTimeout(r, Math.random() * 80));
        await admin\`select pg_terminate_backend(pid) from pg_stat_activity
          where client_port = any(\${[...ports]}::int[]) and random() < 0.5\`.catch(() => {});
      }
    };
    const clients = Array.from({ length: 6 }, client);
    const killing = killer();
    await new Promise((r) => setTimeout(r, 6000));
    stop = true;
    await killing;
    await Promise.all(clients);
    const after = await Promise.all(Array.from({ length: 8 }, () =>
      outcome(rpc(who, "a", "public.log_audit_event", audit))));
    console.log(JSON.stringify({ unanswered, after: [...new Set(after)] }));
    await admin.end();
    Deno.exit(0);`;
    const env = { DB_POOL_SIZE: "2", DB_OPERATION_TIMEOUT_MS: "3000" };
    assert.deepEqual(await childResult(script, env, 90_000), { unanswered: [], after: ["ok"] });
  },
);

// An operation past DB_OPERATION_TIMEOUT_MS replaces the pool it ran on, not
// whichever pool is current: two stuck operations on one pool replaced the
// new pool too, and cut the healthy requests on it (answered 503 though their
// writes went on to commit).
dbTest("a stuck operation replaces only its own pool", async () => {
  const dbModule = new URL("../../shared/db.ts", import.meta.url).href;
  const script = `
    import { withClaims } from ${JSON.stringify(dbModule)};
    const who = { role: "service_role", claims: { role: "service_role" } };
    const outcome = (p) => p.then(() => "ok", (e) => e.status + " " + e.code);
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const sleeping = (s) => outcome(withClaims(who, "s", (tx) => tx\`select pg_sleep(\${s})\`));
    const a = sleeping(6);
    await sleep(500);
    const d = sleeping(6);
    await sleep(1700); // a has replaced the first pool
    const c = sleeping(1.5); // on the second; then d, on the first, runs out
    console.log(JSON.stringify({ a: await a, d: await d, c: await c }));
    Deno.exit(0);`;
  const env = { SUPABASE_DB_URL: db.url, DB_OPERATION_TIMEOUT_MS: "2000" };
  assert.deepEqual(await childResult(script, env, 60_000), {
    a: "503 database_unavailable",
    d: "503 database_unavailable",
    c: "ok",
  });
});
