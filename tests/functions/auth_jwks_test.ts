// Keys read from JWKS_URL, over real HTTP: a verified token is remembered (its
// signature checked once), but only while the key set it was verified with is
// fresh, so a key taken out of the set (rotation after a leak) stops being
// honoured within JWKS_MAX_AGE_SECONDS; and tokens with unknown kids cannot
// make the functions read the set on every request.
import assert from "node:assert/strict";
import { exportJWK, generateKeyPair, SignJWT } from "jose";
import { app } from "../../supabase/functions/observability/index.ts";
import { resetAuth } from "../../shared/auth.ts";
import { ConfigError, env, resetEnv } from "../../shared/env.ts";
import { call, dbTest, expectError, freshDatabase } from "../support/harness.ts";

await freshDatabase();
// a read: these tests write nothing
const AUDIT = "/observability/audit";

/** An ES256 key published under `kid`, and service_role tokens it signs. */
async function signingKey(kid: string) {
  const { publicKey, privateKey } = await generateKeyPair("ES256");
  const jwk = { ...(await exportJWK(publicKey)), kid, alg: "ES256", use: "sig" };
  const sign = () =>
    new SignJWT({ role: "service_role" })
      .setProtectedHeader({ alg: "ES256", kid })
      .setExpirationTime("1h")
      .sign(privateKey);
  return { jwk, sign };
}

type Jwk = Awaited<ReturnType<typeof signingKey>>["jwk"];

/**
 * Serves `keys` (changeable) at JWKS_URL, counting the reads, with
 * JWKS_MAX_AGE_SECONDS as given (unset for the default), around `body`.
 */
async function withJwksUrl(
  keys: Jwk[],
  maxAgeSeconds: string | undefined,
  body: (served: { keys: Jwk[]; reads: number }) => Promise<void>,
): Promise<void> {
  const served = { keys, reads: 0 };
  const server = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, () => {
    served.reads++;
    return Response.json({ keys: served.keys });
  });
  Deno.env.set("JWKS_URL", `http://127.0.0.1:${server.addr.port}/.well-known/jwks.json`);
  if (maxAgeSeconds === undefined) Deno.env.delete("JWKS_MAX_AGE_SECONDS");
  else Deno.env.set("JWKS_MAX_AGE_SECONDS", maxAgeSeconds);
  resetEnv();
  resetAuth();
  try {
    await body(served);
  } finally {
    await server.shutdown();
    Deno.env.delete("JWKS_URL");
    Deno.env.delete("JWKS_MAX_AGE_SECONDS");
    resetEnv();
    resetAuth();
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

dbTest(
  "a remembered token whose key leaves JWKS_URL is refused within JWKS_MAX_AGE_SECONDS",
  async () => {
    const leaked = await signingKey("leaked");
    const next = await signingKey("next");
    await withJwksUrl([leaked.jwk, next.jwk], "1", async (served) => {
      const token = await leaked.sign();
      const ok = await call(app, "GET", AUDIT, { token });
      assert.equal(ok.status, 200, JSON.stringify(ok.body));
      // the rotation: the leaked key is revoked, the next one stays
      served.keys = [next.jwk];
      const revokedAt = Date.now();
      await sleep(revokedAt + 1000 + 100 - Date.now());
      expectError(await call(app, "GET", AUDIT, { token }), 401, "invalid_token");
      // and stays refused
      expectError(await call(app, "GET", AUDIT, { token }), 401, "invalid_token");
      const still = await call(app, "GET", AUDIT, { token: await next.sign() });
      assert.equal(still.status, 200, JSON.stringify(still.body));
    });
  },
);

dbTest(
  "once its key set is older than JWKS_MAX_AGE_SECONDS, a remembered token needs the URL: 503 while it fails",
  async () => {
    const key = await signingKey("k1");
    await withJwksUrl([key.jwk], "1", async (served) => {
      const token = await key.sign();
      assert.equal((await call(app, "GET", AUDIT, { token })).status, 200);
      const readAt = Date.now();
      // not a key set any more (an outage page, a misconfigured proxy)
      served.keys = "maintenance" as unknown as Jwk[];
      await sleep(readAt + 1000 + 100 - Date.now());
      expectError(await call(app, "GET", AUDIT, { token }), 503, "auth_unavailable");
      served.keys = [key.jwk];
      assert.equal((await call(app, "GET", AUDIT, { token })).status, 200);
    });
  },
);

dbTest("a remembered token is not verified again while its key set is fresh", async () => {
  const key = await signingKey("k1");
  await withJwksUrl([key.jwk], undefined, async (served) => {
    const token = await key.sign();
    const subtle = crypto.subtle;
    const verify = subtle.verify;
    let verifications = 0;
    subtle.verify = function (...args: Parameters<typeof verify>) {
      verifications++;
      return verify.apply(subtle, args);
    };
    try {
      for (let i = 0; i < 5; i++) {
        const res = await call(app, "GET", AUDIT, { token });
        assert.equal(res.status, 200, JSON.stringify(res.body));
      }
    } finally {
      subtle.verify = verify;
    }
    assert.equal(verifications, 1, "one signature check for five calls");
    assert.equal(served.reads, 1, "one read of the key set");
  });
});

dbTest(
  "unknown kids read the key set again at most once per cooldown; a new key is then accepted",
  async () => {
    const key = await signingKey("k1");
    await withJwksUrl([key.jwk], undefined, async (served) => {
      const ok = await call(app, "GET", AUDIT, { token: await key.sign() });
      assert.equal(ok.status, 200, JSON.stringify(ok.body));
      assert.equal(served.reads, 1);
      // a flood of tokens naming kids the set does not hold
      const tokens = await Promise.all(
        Array.from({ length: 10 }, async () => (await signingKey(crypto.randomUUID())).sign()),
      );
      const answers = await Promise.all(tokens.map((token) => call(app, "GET", AUDIT, { token })));
      for (const res of answers) expectError(res, 401, "invalid_token");
      assert.equal(served.reads, 1, "no read for tokens within the cooldown");

      // 31 s later (the cooldown is 30 s) a key published since is read and accepted
      const added = await signingKey("k2");
      served.keys = [key.jwk, added.jwk];
      const now = Date.now;
      const later = now() + 31_000;
      Date.now = () => later;
      try {
        const fresh = await call(app, "GET", AUDIT, { token: await added.sign() });
        assert.equal(fresh.status, 200, JSON.stringify(fresh.body));
      } finally {
        Date.now = now;
      }
      assert.equal(served.reads, 2);
    });
  },
);

dbTest("concurrent first requests read the key set once", async () => {
  const key = await signingKey("k1");
  await withJwksUrl([key.jwk], undefined, async (served) => {
    const token = await key.sign();
    const answers = await Promise.all(
      Array.from({ length: 8 }, () => call(app, "GET", AUDIT, { token })),
    );
    for (const res of answers) assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(served.reads, 1);
  });
});

dbTest("JWKS_MAX_AGE_SECONDS outside 1..600 or not a whole number is refused, naming it", () => {
  try {
    for (const bad of ["0", "-5", "601", "1.5", "soon"]) {
      Deno.env.set("JWKS_MAX_AGE_SECONDS", bad);
      resetEnv();
      assert.throws(
        () => env(),
        (e: unknown) => e instanceof ConfigError && /JWKS_MAX_AGE_SECONDS/.test(e.message),
        bad,
      );
    }
    Deno.env.delete("JWKS_MAX_AGE_SECONDS");
    resetEnv();
    assert.equal(env().JWKS_MAX_AGE_SECONDS, 60);
  } finally {
    Deno.env.delete("JWKS_MAX_AGE_SECONDS");
    resetEnv();
  }
  return Promise.resolve();
});
