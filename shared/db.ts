// Direct Postgres access with postgres.js. Every request runs in one
// transaction that first sets role and request.jwt.claims exactly like
// PostgREST, so RLS and auth.uid() behave as they do behind Supabase's API.
import postgres from "postgres";
import { ConfigError, env } from "./env.ts";
import { HttpError, tryAgain } from "./errors.ts";
import type { Principal } from "./auth.ts";
import { log } from "./log.ts";
import { Slots } from "./slots.ts";

export type Sql = postgres.Sql;
export type Tx = postgres.TransactionSql;

let pool: Sql | undefined;
let poolUrl: string | undefined;

// The database went away or would not take the connection: the caller may
// retry (a write sent before the failure was rolled back unless it committed,
// which a keyed retry replays). Socket and postgres.js codes, SQLSTATE class
// 08, and 57P01-03: shut down, crashed, starting up.
const CONNECTION_FAILURES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ECONNABORTED",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTCONN",
  "EPIPE",
  "ETIMEDOUT",
  "ERR_SOCKET_CLOSED",
  "CONNECT_TIMEOUT",
  "CONNECTION_CLOSED",
  "CONNECTION_DESTROYED",
  "CONNECTION_ENDED",
  "57P01",
  "57P02",
  "57P03",
]);

/** Whether an error means the connection is gone (rather than a statement failed). */
function connectionLost(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && (CONNECTION_FAILURES.has(code) || code.startsWith("08"));
}

// Errors of a connection that postgres.js has stopped listening for. When the
// database goes away mid-query (a crash, a failover, a terminated backend)
// it drops a closed connection's socket listeners, and Deno's node:net may
// still report an ECONNRESET or ECONNREFUSED for that socket afterwards; and
// a backend that ends while postgres.js fetches array types on a new
// connection rejects that internal query, which nothing awaits. Nobody can
// catch those rejections, and an uncaught one ends the process: every
// function in the isolate, the dispatcher between a send and its record
// included. The queries themselves fail on their own and are answered 503;
// only these orphans are dropped here, with a log line. Any other unhandled
// rejection still ends the process.
let orphansGuarded = false;

function guardOrphanSocketErrors(): void {
  if (orphansGuarded) return;
  orphansGuarded = true;
  globalThis.addEventListener("unhandledrejection", (event) => {
    if (!connectionLost(event.reason)) return;
    event.preventDefault();
    log("warn", "database connection error after its connection had closed", {
      code: (event.reason as { code: string }).code,
      error: String(event.reason),
    });
  });
}

/** Seconds to wait before the next connection attempt: 50 ms doubling to 1 s, with jitter. */
function reconnectBackoff(retries: number): number {
  return Math.min(0.05 * 2 ** retries, 1) * (0.5 + Math.random() / 2);
}

/** The isolate's one small pool. `prepare: false` keeps it Supavisor-safe. */
export function db(): Sql {
  const e = env();
  if (pool && poolUrl === e.SUPABASE_DB_URL) return pool;
  guardOrphanSocketErrors();
  pool = postgres(e.SUPABASE_DB_URL, {
    prepare: false,
    max: e.DB_POOL_SIZE,
    idle_timeout: 30,
    connect_timeout: 10,
    // Seconds before a connection that failed to open tries again. Queued
    // queries fail one per failed attempt, and postgres.js's own backoff
    // grows to 20 s, so with the database down requests failed one by one
    // for minutes, and the pool came back up to 20 s after it did. At 1 s,
    // the requests holding slots (see admitted) fail within seconds; those
    // waiting for a slot are 503 database_busy after DB_ACQUIRE_TIMEOUT_MS.
    backoff: reconnectBackoff,
    connection: { application_name: "easymo-functions" },
    onnotice: () => {},
  });
  poolUrl = e.SUPABASE_DB_URL;
  return pool;
}

/**
 * Drops the pool for a new one on the next db(): the old one ends, its
 * connections with it, once what runs on it is done or a statement timeout
 * has passed (what is stuck is cut then).
 */
function retirePool(): void {
  const old = pool;
  pool = undefined;
  poolUrl = undefined;
  old?.end({ timeout: Math.ceil(env().DB_STATEMENT_TIMEOUT_MS / 1000) }).catch(() => {});
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
 * A dollar-quoted literal: no escape rules, whatever the server settings. The
 * closing tag must be the first occurrence of the tag after the opening one,
 * also when the value ends with part of it; a value that would break the
 * fixed tag gets a random one.
 */
function literal(value: string): string {
  let tag = "$v$";
  while ((value + tag).indexOf(tag) !== value.length) {
    tag = `$v${crypto.randomUUID().replaceAll("-", "")}$`;
  }
  return `${tag}${value}${tag}`;
}

/**
 * The PostgREST-style settings, transaction-local, as one statement, with
 * the statement timeout (DB_STATEMENT_TIMEOUT_MS, or less when the caller has
 * less time).
 */
function claimsStatement(who: Principal, correlationId: string, timeoutMs?: number): string {
  // never 0, which is no timeout at all
  const statementMs = Math.max(
    1,
    Math.ceil(Math.min(env().DB_STATEMENT_TIMEOUT_MS, timeoutMs ?? Infinity)),
  );
  return `select set_config('role', ${literal(who.role)}, true), ` +
    `set_config('request.jwt.claims', ${literal(JSON.stringify(who.claims))}, true), ` +
    `set_config('request.correlation_id', ${literal(correlationId)}, true), ` +
    `set_config('statement_timeout', '${statementMs}', true)`;
}

const outOfTime = () =>
  tryAgain("deadline_exceeded", "the call did not finish in the time its caller had left");

/**
 * A call's own time limit, shorter than DB_OPERATION_TIMEOUT_MS: a caller
 * that must answer by a deadline of its own (the jobs worker, inside the
 * edge runtime's 150 s) gives up on the call then, a 503, and the database
 * gives up on it at about the same time (its statement timeout is the same
 * limit), so it does not commit unseen long after. The wait for a
 * connection counts: a call whose time ran out while it waited is never sent
 * (see rpc). The pool is not replaced: nothing says it is stuck.
 */
function within<T>(correlationId: string, limitMs: number, call: () => Promise<T>): Promise<T> {
  return beforeTimeout(call(), limitMs, () => {
    log("warn", "database call cut off at its caller's deadline", {
      correlation_id: correlationId,
      limit_ms: Math.round(limitMs),
    });
    return outOfTime();
  });
}

/**
 * `op`'s outcome, or the error `expired` makes once `limitMs` has passed
 * (op's own outcome then comes to nothing: the race has handled it).
 */
async function beforeTimeout<T>(
  op: Promise<T>,
  limitMs: number,
  expired: () => Error,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(expired()), limitMs);
  });
  try {
    return await Promise.race([op, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// At most DB_POOL_SIZE operations (an rpc() or a withClaims()) use the
// database at once per isolate; the others wait their turn, first come first
// served. postgres.js would queue them too, but without a bound: with the pool
// saturated, or the database down, a request waited as long as the edge
// function's wall clock let it. One that waits DB_ACQUIRE_TIMEOUT_MS is a 503
// database_busy instead, and as it never sent a statement it changed nothing,
// so the client may retry it as it would any 503.
const slots = new Slots();

function admitted<T>(correlationId: string, op: () => Promise<T>): Promise<T> {
  const { DB_POOL_SIZE, DB_ACQUIRE_TIMEOUT_MS } = env();
  return slots.run(
    DB_POOL_SIZE,
    DB_ACQUIRE_TIMEOUT_MS,
    () => bounded(correlationId, op),
    (waitedMs) => {
      log("warn", "database busy: a request waited too long for a connection", {
        correlation_id: correlationId,
        waited_ms: Math.round(waitedMs),
        still_waiting: slots.waiting,
      });
      return tryAgain("database_busy", "the database is busy; try again");
    },
  );
}

// postgres.js can lose a request when connections die around it (killed
// backends, a failover): a reserve() handed to a reconnect forgets it, and a
// connection handed to a reserve() that had already failed is stranded. The
// request then waited forever with its slot, and once every slot was held so,
// every later request was 503 database_busy for good. An operation that takes
// DB_OPERATION_TIMEOUT_MS in all is answered 503 (a client retries it like
// any 503; a keyed write replays) and the pool is replaced, so the stranded
// connections end with the old one.
function bounded<T>(correlationId: string, op: () => Promise<T>): Promise<T> {
  const limitMs = env().DB_OPERATION_TIMEOUT_MS;
  // the pool this operation runs on: only it is replaced, not a newer one
  // that the requests after an earlier replacement run on
  const mine = db();
  return beforeTimeout(op(), limitMs, () => {
    log("error", "database operation never finished: replacing the pool", {
      correlation_id: correlationId,
      limit_ms: limitMs,
    });
    if (pool === mine) retirePool();
    return tryAgain("database_unavailable", "the database is not answering; try again");
  });
}

/**
 * Runs `attempt` until it succeeds, retrying serialization failures and
 * deadlocks (the whole transaction was rolled back, so a retry is safe).
 * Errors come out as HttpError.
 */
async function retrying<T>(correlationId: string, attempt: () => Promise<T>): Promise<T> {
  for (let n = 1;; n++) {
    try {
      return await attempt();
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code && RETRYABLE.has(code) && n < 4) {
        await new Promise((r) => setTimeout(r, 5 * n + Math.random() * 20));
        continue;
      }
      throw toHttpError(err, correlationId);
    }
  }
}

/**
 * Runs `fn` in one transaction as `who`: role and claims set first, like
 * PostgREST, with BEGIN and the settings pipelined ahead of fn's first query.
 * For the common one-call case prefer rpc(), which needs one round trip.
 */
export function withClaims<T>(
  who: Principal,
  correlationId: string,
  fn: (tx: Tx) => Promise<T>,
): Promise<T> {
  const setup = `begin; ${claimsStatement(who, correlationId)}`;
  return admitted(correlationId, () => retrying(correlationId, () => inTransaction(setup, fn)));
}

/**
 * A reserved connection's hold on its session. postgres.js does not stop a
 * reserved connection's queries once the connection has closed under it (a
 * backend ended between two of a transaction's queries, or before its
 * COMMIT): the next one is written to the dropped socket, which throws where
 * nothing can catch it and ended the process; and had the connection
 * reconnected for someone else by then, it would have run in their session.
 * The mark reserve() leaves on the connection (its `reserved` callback, which
 * a close clears and a new reservation replaces) is read as the first query
 * executes, and each later query, COMMIT, ROLLBACK and the release first
 * check that it is still there. (postgres.js internals, pinned by the lock
 * file: where the mark cannot be read, queries go as before.) A callback
 * cursor (`.cursor(n, fn)`) sends its next fetch itself once fn returns, so
 * fn is wrapped: with the session gone, the query fails instead and nothing
 * more is sent.
 */
class Hold {
  #connection?: { reserved?: unknown };
  #mark: unknown;

  /** Query options for the first query: remembers the connection it runs on. */
  readonly first = {
    onexecute: (connection: { reserved?: unknown }) => {
      this.#connection = connection;
      this.#mark = connection.reserved;
      // what execute would return without the option: the connection takes more
      return true;
    },
  };

  get lost(): boolean {
    return this.#connection !== undefined && this.#connection.reserved !== this.#mark;
  }

  static #closed = () =>
    Object.assign(new Error("the database connection closed during the transaction"), {
      code: "CONNECTION_CLOSED",
    });

  /** Throws a connection error (a 503, no rollback needed) if the session is gone. */
  check(): void {
    if (this.lost) throw Hold.#closed();
  }

  /** `conn`, refusing every query once the session is gone. */
  guard(conn: Sql): Tx {
    const check = () => this.check();
    const cursors = (query: unknown) => this.#guardCursor(query);
    return new Proxy(conn, {
      apply(target, self, args) {
        check();
        return cursors(Reflect.apply(target, self, args));
      },
      get(target, key, receiver) {
        const value = Reflect.get(target, key, receiver);
        if (key !== "unsafe" || typeof value !== "function") return value;
        return (...args: unknown[]) => {
          check();
          return cursors(Reflect.apply(value, target, args));
        };
      },
    }) as unknown as Tx;
  }

  /**
   * A query's callback cursor, its callback wrapped: once it returns with the
   * session gone, the query is failed and postgres.js is left waiting, so it
   * writes no next fetch to the dropped socket. Helpers that are not queries
   * (tx(values), ...) pass through.
   */
  #guardCursor(query: unknown): unknown {
    type Cursor = (rows?: unknown, fn?: unknown) => unknown;
    const q = query as { cursor?: Cursor; reject?: (err: unknown) => void } | null;
    const cursor = q?.cursor;
    if (typeof cursor !== "function") return query;
    q!.cursor = (rows?: unknown, fn?: unknown) => {
      if (typeof rows === "function") [rows, fn] = [1, rows];
      if (typeof fn !== "function") return cursor.call(q, rows);
      const settle = (answer: unknown) => {
        if (!this.lost) return answer;
        q!.reject?.(Hold.#closed());
        return new Promise(() => {});
      };
      // fn is called as postgres.js would call it: a throw stays a throw (it
      // rejects the query), and only a promise it returns is chained
      return cursor.call(q, rows, (batch: unknown) => {
        const answer = (fn as (batch: unknown) => unknown)(batch);
        return typeof (answer as { then?: unknown } | null)?.then === "function"
          ? Promise.resolve(answer).then(settle)
          : settle(answer);
      });
    };
    return query;
  }
}

/** One attempt of withClaims: `setup` (BEGIN and the settings) pipelined ahead of fn, then COMMIT. */
async function inTransaction<T>(setup: string, fn: (tx: Tx) => Promise<T>): Promise<T> {
  const conn = await db().reserve();
  const hold = new Hold();
  let lost = false;
  try {
    const begun = conn.unsafe(setup, [], hold.first as never).then(() => null, (err) => err);
    let result: T;
    try {
      result = await fn(hold.guard(conn));
    } catch (err) {
      // A failed setup makes every later query fail with 25P02; report the cause.
      throw (await begun) ?? err;
    }
    const setupError = await begun;
    if (setupError) throw setupError;
    hold.check();
    await conn`commit`;
    return result;
  } catch (err) {
    // A connection that is gone is not written to or handed back: postgres.js
    // has already put it among its closed ones, where it reconnects, and a
    // query on it (this rollback) or releasing it into the open ones (the
    // next request's query) writes to a socket it has dropped, which throws
    // where nothing can catch it and ends the process. Its transaction ended
    // with the session.
    lost = connectionLost(err) || hold.lost;
    if (!lost) await conn`rollback`.catch((e) => void (lost = connectionLost(e)));
    throw err;
  } finally {
    if (!lost && !hold.lost) conn.release();
  }
}

/**
 * Text the database accepts, for error messages and the like taken from
 * elsewhere: no NUL (text and jsonb cannot hold \u0000), no lone surrogate
 * (an invalid escape in JSON text), at most `max` code points, cut between
 * code points so an emoji is never split in half.
 */
export function dbText(text: string, max: number): string {
  const out: string[] = [];
  for (const ch of text) {
    if (out.length === max) break;
    if (ch !== "\u0000") out.push(ch);
  }
  // A lone surrogate is one element above; it becomes U+FFFD.
  return out.join("").toWellFormed();
}

export type Row = Record<string, unknown>;

const IDENTIFIER = /^[a-z_][a-z0-9_]*$/;
const QUALIFIED = /^([a-z_][a-z0-9_]*)\.([a-z_][a-z0-9_]*)$/;

/**
 * Calls one SQL function as `who`, PostgREST-rpc style: `args` are the
 * function's parameters without the `p_` prefix (undefined ones are left to
 * their defaults). The settings and the call travel as one simple-protocol
 * message, which Postgres runs as one implicit transaction: one round trip,
 * no BEGIN/COMMIT, and an error rolls the whole message back.
 *
 * Values are sent as dollar-quoted literals of unknown type, which Postgres
 * converts to each parameter's declared type exactly as it would a bound
 * parameter; objects and arrays become JSON text for jsonb parameters.
 *
 * `limitMs`: the time the caller has left for the call, if it has a deadline
 * of its own (see within); less than 1 ms is a 503 at once, and one as long
 * as DB_OPERATION_TIMEOUT_MS or more is no limit (bounded() cuts there).
 */
export async function rpc<T extends Row = Row>(
  who: Principal,
  correlationId: string,
  fn: string,
  args: Record<string, unknown> = {},
  select: RpcSelect = "*",
  limitMs?: number,
): Promise<T[]> {
  const statement = callStatement(fn, args, select);
  if (limitMs !== undefined && !(limitMs >= 1)) throw outOfTime();
  const limit = limitMs !== undefined && limitMs < env().DB_OPERATION_TIMEOUT_MS
    ? limitMs
    : undefined;
  const deadline = limit === undefined ? undefined : performance.now() + limit;
  const call = () =>
    admitted(correlationId, () =>
      retrying(correlationId, async () => {
        // the time left when it is sent, after any wait for a connection (or
        // a retry's pause): none left, and its caller has been answered
        const left = deadline === undefined ? undefined : deadline - performance.now();
        if (left !== undefined && left < 1) throw outOfTime();
        const text = `${claimsStatement(who, correlationId, left)}; ${statement}`;
        // One result per statement: the settings, then the call.
        const results = await db().unsafe(text) as unknown as Row[][];
        return results[1] as T[];
      }));
  return await (limit === undefined ? call() : within(correlationId, limit, call));
}

/**
 * What rpc selects from the function's rows: all columns, all plus one
 * derived in the same transaction (so it sees the same now()), or the named
 * columns only.
 *   * "cursor": created_at as text, for keyset cursors (a JS Date would drop
 *     the microseconds the cursor compares);
 *   * "created": whether this call created the row (`<column> = now()`), for
 *     idempotent creates that answer a replay with 200 instead of 201;
 *   * "pageBytes": the rows, in the function's order, while the JSON text of
 *     the named columns in the rows before stays under `max` bytes (the first
 *     row always), each with `page_bytes`, that text's length up to and
 *     including it. A page of rows whose size the caller does not control
 *     (events of up to a megabyte each) is cut before it reaches the network.
 */
export type RpcSelect =
  | "*"
  | "cursor"
  | { created: "created_at" | "initiated_at" }
  | { columns: readonly string[] }
  | { pageBytes: { max: number; of: readonly string[] } };

function checkColumns(columns: readonly string[]): readonly string[] {
  for (const c of columns) {
    if (!IDENTIFIER.test(c)) throw new Error(`rpc: ${c} is not a column name`);
  }
  return columns;
}

function selectFrom(select: RpcSelect, call: string): string {
  if (select === "*") return `select * from ${call}`;
  if (select === "cursor") return `select *, created_at::text as cursor_ts from ${call}`;
  if ("created" in select) return `select *, ${select.created} = now() as created from ${call}`;
  if ("pageBytes" in select) {
    const { max, of } = select.pageBytes;
    if (!Number.isSafeInteger(max) || max < 1) throw new Error(`rpc: ${max} is not a byte budget`);
    const sizes = checkColumns(of).map((c) => `coalesce(octet_length(f.${c}::text), 0)`);
    // ordinality keeps the function's order through the window and out
    return `select * from (
        select f.*, sum(b.row_bytes) over (order by f.ordinality) as page_bytes, b.row_bytes
        from ${call} with ordinality f
        cross join lateral (select ${sizes.join(" + ")} as row_bytes) b) p
      where p.page_bytes - p.row_bytes < ${max} order by p.ordinality`;
  }
  // only the columns a caller uses: a whole row costs a round of text output
  // and parsing per column
  return `select ${checkColumns(select.columns).join(", ")} from ${call}`;
}

function callStatement(fn: string, args: Record<string, unknown>, select: RpcSelect): string {
  const [, schema, name] = QUALIFIED.exec(fn) ?? [];
  if (!schema) throw new Error(`rpc: ${fn} is not a schema-qualified function name`);
  const params: string[] = [];
  for (const [key, value] of Object.entries(args)) {
    if (value === undefined) continue;
    if (!IDENTIFIER.test(key)) throw new Error(`rpc: ${key} is not a parameter name`);
    params.push(`p_${key} := ${sqlValue(value)}`);
  }
  return selectFrom(select, `${schema}.${name}(${params.join(", ")})`);
}

/** Marks a value for a json/jsonb parameter, so strings and numbers go as JSON. */
export class Json {
  constructor(readonly value: unknown) {}
}
export const asJson = (value: unknown): Json | undefined =>
  value === undefined ? undefined : new Json(value);

/** Marks a value for a text[] parameter (other arrays go as JSON text). */
export class TextArray {
  constructor(readonly items: readonly string[]) {}
}

/** A Postgres array literal: every element double-quoted, \ and " escaped. */
function arrayLiteral(items: readonly string[]): string {
  return `{${items.map((i) => `"${i.replace(/[\\"]/g, (c) => `\\${c}`)}"`).join(",")}}`;
}

function sqlValue(value: unknown): string {
  if (typeof value === "string" && value.includes("\u0000")) {
    // Postgres text cannot hold NUL, and in a simple-protocol message it
    // would end the query text early.
    throw new HttpError(400, "invalid_text", "text may not contain NUL characters");
  }
  if (value === null) return "null";
  if (value instanceof Json) return literal(JSON.stringify(value.value));
  if (value instanceof TextArray) {
    if (value.items.some((i) => i.includes("\u0000"))) return sqlValue("\u0000");
    return literal(arrayLiteral(value.items));
  }
  if (typeof value === "string") return literal(value);
  if (typeof value === "number") {
    if (!Number.isFinite(value)) {
      throw new HttpError(400, "invalid_number", "numbers must be finite");
    }
    return literal(String(value));
  }
  if (typeof value === "boolean" || typeof value === "bigint") return literal(String(value));
  if (value instanceof Date) return literal(value.toISOString());
  return literal(JSON.stringify(value));
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

// The class 22 (data exception) codes a value of the wrong shape raises when
// validation let it through (bad number, date, JSON, encoding, text, pattern):
// the caller's input is at fault. The rest of the class (division by zero, a
// bad array subscript, ...) means our own SQL went wrong on good input, so it
// is a 500, logged like any other fault.
const CALLER_DATA_EXCEPTIONS = new Set([
  "22001", // string_data_right_truncation
  "22003", // numeric_value_out_of_range
  "22004", // null_value_not_allowed
  "22007", // invalid_datetime_format
  "22008", // datetime_field_overflow
  "22009", // invalid_time_zone_displacement_value
  "22021", // character_not_in_repertoire
  "22023", // invalid_parameter_value
  "22025", // invalid_escape_sequence
  "2201B", // invalid_regular_expression
  "22P02", // invalid_text_representation
  "22P05", // untranslatable_character (jsonb's \u0000)
]);

/**
 * Maps a Postgres error to HTTP by SQLSTATE. Domain errors raised with
 * private.raise_error carry 'PT' || status, the stable code as MESSAGE and
 * JSON details as HINT; nothing else is read from the text.
 */
export function toHttpError(err: unknown, correlationId?: string): HttpError {
  if (err instanceof HttpError) return err;
  if (err instanceof ConfigError) {
    // (npm start refuses to start so; a deployed function meets it here)
    log("error", "invalid configuration", { correlation_id: correlationId, error: err.message });
    return new HttpError(500, "internal_error", "something went wrong on our side");
  }
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
    return new HttpError(
      Number(code.slice(2)),
      e.message ?? "error",
      e.detail ?? e.message ?? "",
      details,
    );
  }
  if (CALLER_DATA_EXCEPTIONS.has(code)) {
    return new HttpError(400, "invalid_input", "the database rejected a value", { sqlstate: code });
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
      return new HttpError(400, "invalid_input", "the database rejected a value", {
        constraint: e.constraint_name,
        column: e.column_name,
      });
    case "42501":
      return new HttpError(403, "forbidden", "this role may not do that");
    case "57014":
      return tryAgain("timeout", "the database took too long; try again");
    case "40001":
    case "40P01":
      return tryAgain("contention", "too much contention; try again");
  }
  if (connectionLost(e)) {
    log("warn", "database connection failed", {
      correlation_id: correlationId,
      code,
      error: e.message,
    });
    return tryAgain("database_unavailable", "the database is not answering; try again");
  }
  // no SQLSTATE: thrown in this process (encoding the call, say), not by Postgres
  log("error", code ? "unexpected database error" : "unexpected error making a database call", {
    correlation_id: correlationId,
    sqlstate: code || undefined,
    error: e.message,
  });
  return new HttpError(500, "internal_error", "something went wrong on our side");
}
