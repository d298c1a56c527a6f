// The local stack's keys and banner when tokens are verified with a JWKS and
// there is no JWT secret to sign keys with: the banner says so, the scheduler
// calls with a key the functions accept, and with none the start stops.
import assert from "node:assert/strict";
import { exportJWK, generateKeyPair, SignJWT } from "jose";
import { LOCAL_JWT_SECRET, stackKeys } from "../../scripts/keys.ts";
import { dbTest, freePorts, freshDatabase, TEST_JWT_SECRET } from "../support/harness.ts";

const db = await freshDatabase();
const SERVE = new URL("../../scripts/serve.ts", import.meta.url).pathname;

const { publicKey, privateKey } = await generateKeyPair("ES256");
const JWKS = JSON.stringify({
  keys: [{ ...(await exportJWK(publicKey)), kid: "k1", alg: "ES256", use: "sig" }],
});
const none = { SUPABASE_SECRET_KEYS: [], SUPABASE_PUBLISHABLE_KEYS: [] };

Deno.test("with a JWT secret the keys are signed with it, as before", async () => {
  for (const secret of [LOCAL_JWT_SECRET, TEST_JWT_SECRET]) {
    const keys = await stackKeys({ ...none, JWT_SECRET: secret });
    assert.equal(keys.secret, secret === LOCAL_JWT_SECRET ? LOCAL_JWT_SECRET : "(from JWT_SECRET)");
    assert.equal(keys.jwks, undefined);
    assert.equal(keys.serviceFrom, "JWT_SECRET");
    assert.match(keys.service!, /^eyJ/);
    assert.match(keys.anon!, /^eyJ/);
  }
});

Deno.test("with only a JWKS nothing is signed, and the banner does not claim a secret", async () => {
  for (
    const [config, jwks] of [
      [{ SUPABASE_JWKS: JWKS }, "(from SUPABASE_JWKS)"],
      [{ JWKS_URL: "https://example.supabase.co/auth/v1/.well-known/jwks.json" }, "https://"],
    ] as const
  ) {
    const keys = await stackKeys({ ...none, ...config });
    assert.doesNotMatch(keys.secret, /from JWT_SECRET/);
    assert.match(keys.secret, /^none/);
    assert.ok(keys.jwks?.startsWith(jwks), String(keys.jwks));
    assert.equal(keys.service, undefined);
    assert.equal(keys.anon, undefined);
  }
});

Deno.test("the project's API keys serve when nothing can be signed; given keys win", async () => {
  const keys = await stackKeys({
    SUPABASE_JWKS: JWKS,
    SUPABASE_SECRET_KEYS: ["sb_secret_one", "sb_secret_two"],
    SUPABASE_PUBLISHABLE_KEYS: ["sb_publishable_one"],
  });
  assert.equal(keys.service, "sb_secret_one");
  assert.equal(keys.serviceFrom, "SUPABASE_SECRET_KEYS");
  assert.equal(keys.anon, "sb_publishable_one");
  const given = await stackKeys({
    JWT_SECRET: TEST_JWT_SECRET,
    SUPABASE_SECRET_KEYS: ["sb_secret_one"],
    SUPABASE_PUBLISHABLE_KEYS: [],
    serviceRoleKey: "given.service.key",
    anonKey: "given.anon.key",
  });
  assert.equal(given.service, "given.service.key");
  assert.equal(given.serviceFrom, "SUPABASE_SERVICE_ROLE_KEY");
  assert.equal(given.anon, "given.anon.key");
});

/** serve.ts with a JWKS and no JWT secret, plus `vars`. */
function serve(vars: Record<string, string>) {
  const [api, sandbox] = freePorts();
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", SERVE],
    env: {
      API_PORT: String(api),
      WHATSAPP_SANDBOX_PORT: String(sandbox),
      DATABASE_URL: db.url,
      JWT_SECRET: "",
      SUPABASE_JWKS: JWKS,
      JWKS_URL: "",
      SUPABASE_SECRET_KEYS: "",
      SUPABASE_PUBLISHABLE_KEYS: "",
      SUPABASE_SERVICE_ROLE_KEY: "",
      SUPABASE_ANON_KEY: "",
      WHATSAPP_ACCESS_TOKEN: "",
      ...vars,
    },
    stdout: "piped",
    stderr: "piped",
    // a stack that starts anyway runs until stopped
    signal: AbortSignal.timeout(30_000),
  });
}

/** Runs serve.ts expecting it to stop at once; its exit code and output. */
async function serveStops(vars: Record<string, string>) {
  const out = await serve(vars).output();
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr).trim(),
  };
}

dbTest("with a JWKS and no service key the scheduler does not start: the start stops", async () => {
  const { code, stdout, stderr } = await serveStops({});
  assert.equal(code, 1, stdout + stderr);
  assert.equal(stderr.split("\n").length, 1, stderr);
  assert.match(stderr, /scheduler/);
  assert.match(stderr, /SUPABASE_SECRET_KEYS/);
  assert.match(stderr, /SUPABASE_SERVICE_ROLE_KEY/);
  assert.match(stderr, /SCHEDULER=off/);
  assert.doesNotMatch(stdout, /running/);
});

dbTest("a SUPABASE_SERVICE_ROLE_KEY the functions refuse stops the start, naming it", async () => {
  const anon = await new SignJWT({ role: "anon" })
    .setProtectedHeader({ alg: "ES256", kid: "k1" })
    .setExpirationTime("1h")
    .sign(privateKey);
  for (const [key, why] of [["not-a-jwt", /not a JWT/], [anon, /anon/]] as const) {
    const { code, stdout, stderr } = await serveStops({ SUPABASE_SERVICE_ROLE_KEY: key });
    assert.equal(code, 1, stdout + stderr);
    assert.equal(stderr.split("\n").length, 1, stderr);
    assert.match(stderr, /SUPABASE_SERVICE_ROLE_KEY/);
    assert.match(stderr, why);
    assert.doesNotMatch(stdout, /running/);
  }
});

dbTest(
  "with a JWKS and a secret API key the banner is true and the scheduler's calls are accepted",
  async () => {
    const secretKey = `sb_secret_${crypto.randomUUID()}`;
    const child = serve({
      SUPABASE_SECRET_KEYS: JSON.stringify({ default: secretKey }),
      LOG_LEVEL: "info",
    }).spawn();
    let stdout = "";
    let stderr = "";
    const drain = async (stream: ReadableStream<Uint8Array>, add: (s: string) => void) => {
      for await (const chunk of stream.pipeThrough(new TextDecoderStream())) add(chunk);
    };
    const drained = Promise.all([
      drain(child.stdout, (s) => (stdout += s)),
      drain(child.stderr, (s) => (stderr += s)),
    ]);
    /** The scheduler's log lines for its endpoint schedules. */
    const ticks = () =>
      (stdout + stderr).split("\n").filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l))
        .filter((l) => l.msg === "schedule ran" && "status" in l);
    try {
      const deadline = Date.now() + 25_000;
      while (ticks().length < 3 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 100));
      }
      const banner = stdout.slice(0, stdout.indexOf("Press Ctrl-C"));
      assert.match(banner, /running/, stdout + stderr);
      assert.doesNotMatch(banner, /from JWT_SECRET/);
      assert.match(banner, /JWT secret: none/);
      assert.match(banner, /JWKS: \(from SUPABASE_JWKS\)/);
      assert.match(banner, new RegExp(`service_role key: ${secretKey}\n`));
      assert.deepEqual(
        ticks().map((t) => `${t.schedule} ${t.status}`).sort(),
        ["maintain-partitions 200", "run-jobs 200", "whatsapp-dispatch 200"],
        stdout + stderr,
      );
    } finally {
      child.kill("SIGINT");
      await child.status;
      await drained;
    }
  },
);
