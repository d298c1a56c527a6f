// Configuration, read and validated once per isolate. A missing or malformed
// variable fails loudly, naming the variable, instead of failing later.
import { z } from "zod";

const optionalUrl = z.string().url().optional();

/** What a JSON variable's reader answers for a value of the wrong shape. */
const INVALID = Symbol("invalid");

/**
 * An optional variable holding JSON: `read` turns the parsed value into the
 * setting, or INVALID when it has the wrong shape (a configuration error
 * naming the variable, saying `expected`). Unset gives `unset`.
 */
function jsonVariable<T>(
  expected: string,
  unset: T,
  read: (parsed: unknown) => T | typeof INVALID,
) {
  return z.string().optional().transform((raw, ctx) => {
    if (raw === undefined) return unset;
    let value: T | typeof INVALID;
    try {
      value = read(JSON.parse(raw));
    } catch {
      value = INVALID;
    }
    if (value === INVALID) {
      ctx.addIssue({ code: "custom", message: `must be ${expected}` });
      return z.NEVER;
    }
    return value;
  });
}

/**
 * A JSON Web Key Set, `{"keys": [...]}` or the bare array; read as `{"keys": [...]}`.
 * An empty set counts as unset: Supabase provides the set its Auth serves,
 * which is empty for a project still signing with the legacy JWT secret.
 */
const jwks = jsonVariable<string | undefined>(
  'a JSON key set: {"keys": [JWK, ...]}',
  undefined,
  (parsed) => {
    const keys = Array.isArray(parsed) ? parsed : (parsed as { keys?: unknown } | null)?.keys;
    if (!Array.isArray(keys)) return INVALID;
    if (keys.length === 0) return undefined;
    const valid = keys.every((k) => k && typeof k === "object" && typeof k.kty === "string");
    return valid ? JSON.stringify({ keys }) : INVALID;
  },
);

/** A JSON object of named API keys, each starting with `prefix`; the keys alone. */
const apiKeys = (prefix: string) =>
  jsonVariable<string[]>(`a JSON object of keys that start with ${prefix}`, [], (parsed) => {
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) return INVALID;
    const keys = Object.values(parsed);
    const valid = keys.length > 0 &&
      keys.every((k) => typeof k === "string" && k.startsWith(prefix));
    return valid ? keys as string[] : INVALID;
  });

const schema = z.object({
  // Provided by Supabase to every function; the local stack sets it.
  SUPABASE_DB_URL: z.string().regex(/^postgres(ql)?:\/\//, "must be a postgres:// URL"),
  SUPABASE_URL: optionalUrl,
  // HS256 projects: the JWT secret. Asymmetric projects: SUPABASE_JWKS (the
  // JSON key set Supabase provides) or JWKS_URL.
  JWT_SECRET: z.string().min(32, "must be at least 32 characters").optional(),
  SUPABASE_JWKS: jwks,
  JWKS_URL: optionalUrl,
  // A key set read from JWKS_URL, and every token verified with it, is
  // trusted this long before the URL is read again: a key taken out of the
  // set (rotation after a leak) is refused within this time.
  JWKS_MAX_AGE_SECONDS: z.coerce.number().int().min(1).max(600).default(60),
  // Supabase's API keys, as it provides them: JSON objects of name -> key. A
  // secret key (sb_secret_...) speaks for the service role, a publishable key
  // (sb_publishable_...) for anon; neither is a JWT.
  SUPABASE_SECRET_KEYS: apiKeys("sb_secret_"),
  SUPABASE_PUBLISHABLE_KEYS: apiKeys("sb_publishable_"),
  DB_POOL_SIZE: z.coerce.number().int().min(1).max(100).default(4),
  // How long a request waits for one of the pool's connections before it is
  // answered 503 database_busy (having sent nothing).
  DB_ACQUIRE_TIMEOUT_MS: z.coerce.number().int().min(100).max(150_000).default(5_000),
  DB_STATEMENT_TIMEOUT_MS: z.coerce.number().int().min(100).max(150_000).default(10_000),
  // How long one database operation (an rpc, or a whole withClaims
  // transaction) may take in all before it is answered 503 and the pool is
  // replaced (see shared/db.ts, bounded).
  DB_OPERATION_TIMEOUT_MS: z.coerce.number().int().min(1000).max(150_000).default(30_000),
  MAX_BODY_BYTES: z.coerce.number().int().min(1024).max(50 * 1024 * 1024).default(1024 * 1024),
  // The jobs worker (POST /jobs/run) stops claiming after this long; a claimed
  // job may still run up to its timeout_seconds (at most 120 s) past it.
  JOBS_RUN_BUDGET_MS: z.coerce.number().int().min(1000).max(25_000).default(25_000),
  // ... or once the process has spent this much CPU since the run began: the
  // hosted edge runtime ends a request after 2 s of CPU, and quick jobs spend
  // CPU faster than the clock runs out (19,624 trivial jobs: 2.7 s).
  JOBS_RUN_CPU_BUDGET_MS: z.coerce.number().int().min(100).max(1_500).default(1_000),
  LOG_LEVEL: z.enum(["debug", "info", "warn", "error", "silent"]).default("info"),
});

export type Env = z.infer<typeof schema>;

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

let cached: Env | undefined;

/**
 * Reads the variables a zod object schema names (empty counts as unset) and
 * validates them, or throws a ConfigError naming each bad variable. Modules
 * with their own settings (e.g. shared/whatsapp.ts) use it for their schema.
 */
export function readEnvSchema<S extends z.ZodObject>(
  schema: S,
  label = "configuration",
): z.infer<S> {
  const raw: Record<string, string | undefined> = {};
  for (const key of Object.keys(schema.shape)) {
    const value = Deno.env.get(key);
    raw[key] = value === "" ? undefined : value;
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((i) =>
      `${i.path.join(".")}: ${
        i.message === "Invalid input: expected string, received undefined"
          ? "is required"
          : i.message
      }`
    );
    throw new ConfigError(`invalid ${label}: ${problems.join("; ")}`);
  }
  return parsed.data;
}

export function env(): Env {
  if (cached) return cached;
  const value = readEnvSchema(schema);
  if (!value.JWT_SECRET && !value.SUPABASE_JWKS && !value.JWKS_URL) {
    throw new ConfigError(
      "invalid configuration: JWT_SECRET (HS256) or SUPABASE_JWKS / JWKS_URL (asymmetric keys) is required",
    );
  }
  cached = value;
  return value;
}

/** Forget the cached configuration (tests change variables between cases). */
export function resetEnv(): void {
  cached = undefined;
}
