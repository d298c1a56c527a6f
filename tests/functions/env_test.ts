import assert from "node:assert/strict";
import { ConfigError, env, resetEnv } from "../../shared/env.ts";

function withEnv(vars: Record<string, string | undefined>, fn: () => void) {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, Deno.env.get(k)]));
  for (const [k, v] of Object.entries(vars)) {
    v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
  }
  resetEnv();
  try {
    fn();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
    }
    resetEnv();
  }
}

Deno.test("a missing SUPABASE_DB_URL is named in the error", () => {
  withEnv({ SUPABASE_DB_URL: undefined, JWT_SECRET: "x".repeat(40) }, () => {
    assert.throws(
      () => env(),
      (e: unknown) => e instanceof ConfigError && /SUPABASE_DB_URL/.test(e.message),
    );
  });
});

Deno.test("a short JWT_SECRET is refused, naming it", () => {
  withEnv({ SUPABASE_DB_URL: "postgresql://u:p@localhost/db", JWT_SECRET: "short" }, () => {
    assert.throws(
      () => env(),
      (e: unknown) => e instanceof ConfigError && /JWT_SECRET/.test(e.message),
    );
  });
});

Deno.test("no way to verify tokens is a configuration error", () => {
  withEnv(
    {
      SUPABASE_DB_URL: "postgresql://u:p@localhost/db",
      JWT_SECRET: undefined,
      SUPABASE_JWKS: undefined,
      JWKS_URL: undefined,
    },
    () => {
      assert.throws(
        () => env(),
        (e: unknown) => e instanceof ConfigError && /JWT_SECRET/.test(e.message),
      );
    },
  );
});

Deno.test("defaults apply and numbers are coerced", () => {
  withEnv(
    {
      SUPABASE_DB_URL: "postgresql://u:p@localhost/db",
      JWT_SECRET: "x".repeat(40),
      DB_POOL_SIZE: "7",
      MAX_BODY_BYTES: undefined,
    },
    () => {
      const e = env();
      assert.equal(e.DB_POOL_SIZE, 7);
      assert.equal(e.MAX_BODY_BYTES, 1024 * 1024);
    },
  );
});

Deno.test("API keys are read from Supabase's JSON objects; anything else is refused, naming it", () => {
  const base = { SUPABASE_DB_URL: "postgresql://u:p@localhost/db", JWT_SECRET: "x".repeat(40) };
  withEnv({
    ...base,
    SUPABASE_SECRET_KEYS: JSON.stringify({ default: "sb_secret_a", cron: "sb_secret_b" }),
    SUPABASE_PUBLISHABLE_KEYS: undefined,
  }, () => {
    assert.deepEqual(env().SUPABASE_SECRET_KEYS, ["sb_secret_a", "sb_secret_b"]);
    assert.deepEqual(env().SUPABASE_PUBLISHABLE_KEYS, []);
  });
  for (
    const bad of [
      "sb_secret_a", // the key itself, not the object
      "{}",
      JSON.stringify({ default: "sb_publishable_a" }), // a publishable key as a secret one
      JSON.stringify({ default: 42 }),
    ]
  ) {
    withEnv({ ...base, SUPABASE_SECRET_KEYS: bad }, () => {
      assert.throws(
        () => env(),
        (e: unknown) => e instanceof ConfigError && /SUPABASE_SECRET_KEYS/.test(e.message),
        bad,
      );
    });
  }
});

Deno.test("an empty SUPABASE_JWKS counts as unset (a project on the legacy JWT secret)", () => {
  const base = { SUPABASE_DB_URL: "postgresql://u:p@localhost/db", JWKS_URL: undefined };
  for (const empty of [JSON.stringify({ keys: [] }), "[]"]) {
    withEnv({ ...base, JWT_SECRET: "x".repeat(32), SUPABASE_JWKS: empty }, () => {
      assert.equal(env().SUPABASE_JWKS, undefined, empty);
      assert.equal(env().JWT_SECRET, "x".repeat(32));
    });
    withEnv({ ...base, JWT_SECRET: undefined, SUPABASE_JWKS: empty }, () => {
      assert.throws(
        () => env(),
        (e: unknown) => e instanceof ConfigError && /JWT_SECRET .* is required/.test(e.message),
        empty,
      );
    });
  }
});

Deno.test("SUPABASE_JWKS must be a key set; the bare array form is read as one", () => {
  const base = { SUPABASE_DB_URL: "postgresql://u:p@localhost/db", JWT_SECRET: undefined };
  const jwk = { kty: "EC", crv: "P-256", x: "x", y: "y", kid: "k1" };
  withEnv({ ...base, SUPABASE_JWKS: JSON.stringify([jwk]) }, () => {
    assert.deepEqual(JSON.parse(env().SUPABASE_JWKS!), { keys: [jwk] });
  });
  for (const bad of ["{not json", "{}", JSON.stringify({ keys: [1] })]) {
    withEnv({ ...base, SUPABASE_JWKS: bad }, () => {
      assert.throws(
        () => env(),
        (e: unknown) => e instanceof ConfigError && /SUPABASE_JWKS/.test(e.message),
        bad,
      );
    });
  }
});
