// Direct Postgres access with postgres.js. Every request runs in one
// transaction that first sets role and request.jwt.claims exactly like
// PostgREST, so RLS and auth.uid() behave as they do behind Supabase's API.
import postgres from "postgres";
import { env } from "./env.ts";
import { HttpError } from "./errors.ts";
import type { Principal } from "./auth.ts";
import { log } from "./log.ts";

export type Sql = postgres.Sql;
export type Tx = postgres.TransactionSql;

let pool: Sql | undefined;
let poolUrl: string | undefined;

/** The isolate's one small pool. `prepare: false` keeps it Supavisor-safe. */
export function db(): Sql {
  const e = env();
  if (pool && poolUrl === e.SUPABASE_DB_URL) return pool;
  pool = postgres(e.SUPABASE_DB_URL, {
    prepare: false,
    max: e.DB_POOL_SIZE,
    idle_timeout: 30,
    connect_timeout: 10,
    connection: { application_name: "easymo-functions" },
    onnotice: () => {},
  });
  poolUrl = e.SUPABASE_DB_URL;
  return pool;
}

/** Closes the pool (tests and graceful shutdown). */
export async function closeDb(): Promise<void> {
  const p = pool;
  pool = undefined;
  poolUrl = undefined;
  await p?.end({ timeout: 5 });
}

/** A JSON parameter (jsonb); undefined becomes SQL null. */
export function jsonb(tx: Sql | Tx, value: unknown): postgres.Parameter | null {
  return value === undefined ? null : tx.json(value as postgres.JSONValue);
}

const RETRYABLE = new Set(["40001", "40P01"]);

/**
 * Runs `fn` in one transaction as `who`: role and claims set first, like
 * PostgREST. Serialization failures and deadlocks retry the whole transaction
 * a few times; they are never surfaced half-done.
 */
export async function withClaims<T>(
  who: Principal,
  correlationId: string,
  fn: (tx: Tx) => Promise<T>,
): Promise<T> {
  const claims = JSON.stringify(who.claims);
  const timeout = String(env().DB_STATEMENT_TIMEOUT_MS);
  for (let attempt = 1;; attempt++) {
    try {
      return await db().begin(async (tx) => {
        // Sent now and pipelined with fn's first query on this connection
        // (one round trip fewer); Postgres runs them in order, and if it
        // failed, fn's query fails too and begin() rethrows this error.
        const claimsSet = tx`select set_config('role', ${who.role}, true),
                        set_config('request.jwt.claims', ${claims}, true),
                        set_config('request.correlation_id', ${correlationId}, true),
                        set_config('statement_timeout', ${timeout}, true)`.execute();
        const result = await fn(tx);
        await claimsSet;
        return result;
      }) as T;
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code && RETRYABLE.has(code) && attempt < 4) {
        await new Promise((r) => setTimeout(r, 5 * attempt + Math.random() * 20));
        continue;
      }
      throw toHttpError(err, correlationId);
    }
  }
}

interface PgError {
  name?: string;
  code?: string;
  message?: string;
  detail?: string;
  hint?: string;
  constraint_name?: string;
  column_name?: string;
}

/**
 * Maps a Postgres error to HTTP by SQLSTATE. Domain errors raised with
 * private.raise_error carry 'PT' || status, the stable code as MESSAGE and
 * JSON details as HINT; nothing else is read from the text.
 */
export function toHttpError(err: unknown, correlationId?: string): HttpError {
  if (err instanceof HttpError) return err;
  const e = err as PgError;
  const code = e.code ?? "";
  if (/^PT[45]\d\d$/.test(code)) {
    let details: unknown;
    if (e.hint) {
      try {
        details = JSON.parse(e.hint);
      } catch {
        details = undefined;
      }
    }
    return new HttpError(Number(code.slice(2)), e.message ?? "error", e.detail ?? e.message ?? "", details);
  }
  switch (code) {
    case "23505":
      return new HttpError(409, "conflict", "a record with these values already exists", {
        constraint: e.constraint_name,
      });
    case "23503":
      return new HttpError(409, "reference_not_found", "a referenced record does not exist", {
        constraint: e.constraint_name,
      });
    case "23514":
    case "23502":
    case "22P02":
    case "22003":
    case "22007":
    case "22008":
    case "22023":
    case "22001":
      return new HttpError(400, "invalid_input", "the database rejected a value", {
        constraint: e.constraint_name,
        column: e.column_name,
      });
    case "42501":
      return new HttpError(403, "forbidden", "this role may not do that");
    case "57014":
      return new HttpError(503, "timeout", "the database took too long; try again");
    case "40001":
    case "40P01":
      return new HttpError(503, "contention", "too much contention; try again");
  }
  log("error", "unexpected database error", {
    correlation_id: correlationId,
    sqlstate: code || undefined,
    error: e.message,
  });
  return new HttpError(500, "internal_error", "something went wrong on our side");
}
