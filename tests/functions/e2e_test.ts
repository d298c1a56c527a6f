// End to end over real HTTP, the way a front-end calls functions: the local
// router on a real port and supabase-js functions.invoke.
import assert from "node:assert/strict";
import { createClient, FunctionRegion, FunctionsHttpError } from "@supabase/supabase-js";
import {
  anonToken,
  createUser,
  dbTest,
  freePorts,
  freshDatabase,
  serviceToken,
  startLocalApi,
  userToken,
} from "../support/harness.ts";

const db = await freshDatabase();
const api = await startLocalApi();

/** A front-end's client: the anon key, and a signed-in user's token on every call. */
async function userClient(uid: string) {
  return createClient(api.url, await anonToken(), {
    global: { headers: { Authorization: `Bearer ${await userToken(uid)}` } },
    auth: { persistSession: false, autoRefreshToken: false },
  });
}

dbTest("a signed-in user writes and reads audit events through functions.invoke", async () => {
  const uid = await createUser(db);
  const supabase = await userClient(uid);
  const written = await supabase.functions.invoke("observability/audit", {
    body: {
      actor_type: "user",
      actor_identifier: uid,
      action: "trip_requested",
      resource_type: "trip",
      resource_id: "trip-e2e",
    },
  });
  assert.equal(written.error, null, String(written.error));
  assert.match(String(written.data.id), /^\d+$/);

  const read = await supabase.functions.invoke("observability/audit?resource_id=trip-e2e", {
    method: "GET",
  });
  assert.equal(read.error, null);
  assert.equal(read.data.data.length, 1);
  assert.equal(read.data.data[0].user_id, uid);
});

dbTest("errors reach supabase-js as FunctionsHttpError with our error shape", async () => {
  const supabase = createClient(api.url, await anonToken(), { auth: { persistSession: false } });
  const res = await supabase.functions.invoke("observability/metrics", {
    body: { service_name: "api", metric_type: "latency", metric_name: "x", value: 1 },
  });
  assert.ok(res.error instanceof FunctionsHttpError);
  const response = res.error.context as Response;
  assert.equal(response.status, 401);
  const body = await response.json();
  assert.equal(body.error.code, "login_required");
  assert.equal(body.correlation_id, response.headers.get("x-correlation-id"));
});

dbTest("the service role records a metric over HTTP; unknown functions are 404", async () => {
  const supabase = createClient(api.url, await serviceToken(), { auth: { persistSession: false } });
  const res = await supabase.functions.invoke("observability/metrics", {
    body: { service_name: "api", metric_type: "latency", metric_name: "e2e", value: 12.5 },
    headers: { "x-correlation-id": "e2e-corr" },
  });
  assert.equal(res.error, null);
  const [row] = await db
    .sql`select value, correlation_id from public.system_metrics where metric_name = 'e2e'`;
  assert.equal(row.value, 12.5);
  assert.equal(row.correlation_id, "e2e-corr");

  const missing = await fetch(`${api.url}/functions/v1/no-such-function`);
  assert.equal(missing.status, 404);
  assert.equal(missing.headers.get("access-control-allow-origin"), "*");
  assert.equal((await missing.json()).error.code, "function_not_found");
});

/** One request with its path (and Host) exactly as given (fetch would resolve dot segments first). */
async function rawGet(
  path: string,
  token: string,
  host = "x",
): Promise<{ head: string; body: string }> {
  const { port } = new URL(api.url);
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: Number(port) });
  try {
    await conn.write(
      new TextEncoder().encode(
        `GET ${path} HTTP/1.1\r\nHost: ${host}\r\nAuthorization: Bearer ${token}\r\n` +
          "Connection: close\r\n\r\n",
      ),
    );
    const text = new TextDecoder().decode(
      await new Response(conn.readable).arrayBuffer(),
    );
    const [head, body] = text.split("\r\n\r\n");
    return { head: head.toLowerCase(), body };
  } catch (err) {
    conn.close();
    throw err;
  }
}

dbTest(
  "an encoded dot segment stays in the function it was sent to, which answers 404",
  async () => {
    // new URL() reads /events/%2e%2e/queues as /queues; the events app sees it as sent
    const { head, body } = await rawGet("/functions/v1/events/%2e%2e/queues", await serviceToken());
    assert.match(head, /^http\/1\.1 404/);
    assert.match(head, /\r\nx-correlation-id: /);
    assert.match(body, /"code":"not_found"/);
  },
);

// Deno builds the request's URL from the Host header unchecked: a Host with a
// path in it must not choose the function instead of the request's own path.
dbTest("a Host header that is not a host and port is 400, not routed", async () => {
  const token = await serviceToken();
  for (const host of ["127.0.0.1/functions/v1/queues", "x?y", "a@b", "x#y"]) {
    const { head, body } = await rawGet("/", token, host);
    assert.match(head, /^http\/1\.1 400/, host);
    assert.match(body, /"code":"invalid_host"/, host);
  }
  for (const host of ["localhost:54321", "[::1]:8080", "api.easymo.rw"]) {
    const { head } = await rawGet("/functions/v1/queues", token, host);
    assert.match(head, /^http\/1\.1 200/, host);
  }
});

// supabase-js pins a call to a region with ?forceFunctionRegion= and x-region
dbTest("a call pinned to a region is served like any other", async () => {
  const supabase = await userClient(await createUser(db));
  const read = await supabase.functions.invoke("observability/audit?resource_id=none", {
    method: "GET",
    region: FunctionRegion.EuWest3,
  });
  assert.equal(read.error, null, String(read.error));
  assert.deepEqual(read.data.data, []);
});

// `npm start` while another stack runs: the local API's process stops at the
// first port it cannot take, with one line naming the port's variable.
async function serveWithPortTaken(taken: "API_PORT" | "WHATSAPP_SANDBOX_PORT") {
  const holder = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const free = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const freePort = (free.addr as Deno.NetAddr).port;
  free.close();
  const ports = { API_PORT: String(freePort), WHATSAPP_SANDBOX_PORT: String(freePort) };
  ports[taken] = String((holder.addr as Deno.NetAddr).port);
  try {
    const serve = new URL("../../scripts/serve.ts", import.meta.url).pathname;
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--quiet", serve],
      env: { ...ports, DATABASE_URL: db.url, SCHEDULER: "off", WHATSAPP_ACCESS_TOKEN: "" },
      stdout: "null",
      stderr: "piped",
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr).trim() };
  } finally {
    holder.close();
  }
}

for (const taken of ["API_PORT", "WHATSAPP_SANDBOX_PORT"] as const) {
  dbTest(`a second local stack whose ${taken} is taken stops with one clear line`, async () => {
    const { code, stderr } = await serveWithPortTaken(taken);
    assert.equal(code, 1);
    assert.match(stderr, new RegExp(`port is in use.*set ${taken}\\.$`));
    assert.equal(stderr.split("\n").length, 1, stderr);
  });
}

const SERVE = new URL("../../scripts/serve.ts", import.meta.url).pathname;

dbTest("a malformed variable stops the local stack before it starts, naming it", async () => {
  const [api, sandbox] = freePorts();
  for (const [name, value] of [["DB_POOL_SIZE", "abc"], ["LOG_LEVEL", "verbose"]]) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--quiet", SERVE],
      env: {
        API_PORT: String(api),
        WHATSAPP_SANDBOX_PORT: String(sandbox),
        DATABASE_URL: db.url,
        SCHEDULER: "off",
        [name]: value,
      },
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(20_000), // a stack that starts anyway runs until stopped
    }).output();
    const stderr = new TextDecoder().decode(out.stderr).trim();
    assert.equal(out.code, 1, stderr);
    assert.match(stderr, new RegExp(`^invalid configuration: ${name}: `));
    assert.equal(stderr.split("\n").length, 1, stderr);
    assert.doesNotMatch(new TextDecoder().decode(out.stdout), /running/);
  }
});

dbTest("a database URL the functions cannot use stops the start, its password hidden", async () => {
  // psql and the Supabase CLI read a password from the query string; postgres.js does not
  const u = new URL(db.url);
  const url = `postgresql://${u.host}${u.pathname}?user=${u.username}&password=${u.password}`;
  const [api, sandbox] = freePorts();
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", SERVE],
    env: {
      API_PORT: String(api),
      WHATSAPP_SANDBOX_PORT: String(sandbox),
      DATABASE_URL: url,
      PGPASSWORD: "",
      SCHEDULER: "off",
    },
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(20_000),
  }).output();
  const printed = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, printed);
  assert.match(printed, /^the functions cannot use DATABASE_URL: /m);
  assert.ok(!printed.includes(`password=${u.password}`), printed);
});

dbTest(
  "Ctrl-C lets a request in flight finish; SQL jobs pg_cron does not run are scheduled here",
  async () => {
    const [api, sandbox] = freePorts();
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--quiet", SERVE],
      env: { API_PORT: String(api), WHATSAPP_SANDBOX_PORT: String(sandbox), DATABASE_URL: db.url },
      stdout: "piped",
      stderr: "null",
      signal: AbortSignal.timeout(30_000),
    }).spawn();
    let banner = "";
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    while (!banner.includes("Press Ctrl-C")) {
      const { value, done } = await reader.read();
      if (done) break;
      banner += value;
    }
    const serviceKey = banner.match(/service_role key: (\S+)/)?.[1];
    assert.ok(serviceKey, banner);
    // the test database is not pg_cron's: its SQL jobs run from the local scheduler
    const [{ cron }] = await db.sql`select to_regclass('cron.job') is not null as cron`;
    const scheduler = banner.match(/Scheduler: (.*)/)?.[1].split(", ");
    assert.deepEqual(
      scheduler,
      cron ? ["maintain-partitions", "run-jobs", "whatsapp-dispatch"] : [
        "maintain-partitions",
        "sequence-events",
        "purge-transaction-idempotency-keys",
        "run-jobs",
        "whatsapp-dispatch",
      ],
    );
    // a long poll waits 2 s for a message; Ctrl-C comes after half a second
    const started = performance.now();
    const inFlight = fetch(`http://127.0.0.1:${api}/functions/v1/queues/e2e-stop/claim`, {
      method: "POST",
      headers: { authorization: `Bearer ${serviceKey}`, "content-type": "application/json" },
      body: JSON.stringify({ wait_seconds: 2 }),
    });
    await new Promise((r) => setTimeout(r, 500));
    child.kill("SIGINT");
    const res = await inFlight;
    assert.equal(res.status, 200);
    assert.deepEqual((await res.json()).messages, []);
    assert.ok(performance.now() - started >= 1900, "it waited out its poll");
    const { code } = await child.status;
    assert.equal(code, 0);
    reader.releaseLock();
    await child.stdout.cancel().catch(() => {});
  },
);

dbTest("stop the local API", async () => {
  await api.close();
});
