// The HTTP layer every function shares: an app factory with the one error
// shape, correlation ids, CORS, request logging, body limits and validation.
import { type Context, Hono } from "hono";
import { cors } from "hono/cors";
import { getPath } from "hono/utils/url";
import type { z } from "zod";
import type { Principal } from "./auth.ts";
import { env } from "./env.ts";
import { badRequest, errorBody, HttpError, payloadTooLarge } from "./errors.ts";
import { toHttpError } from "./db.ts";
import { log } from "./log.ts";

export interface AppEnv {
  Variables: { correlationId: string; principal?: Principal };
}
export type Ctx = Context<AppEnv>;

const CORRELATION_ID = /^[A-Za-z0-9._:-]{1,128}$/;

/** A route path as a RegExp, for the 405 check: `:name{a|b}` keeps its own pattern. */
function compileRoute(path: string): RegExp {
  const own: string[] = [];
  const pattern = path
    .replace(
      /:[A-Za-z0-9_]+\{([^}]+)\}/g,
      (_, re: string) => `\uE000${own.push(`(?:${re})`) - 1}\uE000`,
    )
    .replace(/[.+?^${}()|[\]\\]/g, "\\$&")
    .replace(/\/\*$/, "(?:/.*)?")
    .replace(/:[A-Za-z0-9_]+/g, "[^/]+")
    .replace(/\*/g, ".*")
    .replace(/\uE000(\d+)\uE000/g, (_, i: string) => own[Number(i)]);
  return new RegExp(`^${pattern}$`);
}

// Supabase hands a function the path from /<name> on; the local gateway (and
// anyone calling a function's app with the public URL) has /functions/v1 in
// front. Stripping it while routing saves cloning every Request.
const GATEWAY_PREFIX = "/functions/v1/";
// A trailing slash names the same route (/metrics/ is /metrics).
function functionPath(req: Request): string {
  const full = getPath(req);
  const path = full.startsWith(GATEWAY_PREFIX) ? full.slice(GATEWAY_PREFIX.length - 1) : full;
  return path.length > 1 && path.endsWith("/") ? path.slice(0, -1) : path;
}

/** The methods of each route path without parameters or wildcards. */
function literalRouteMethods(routes: { method: string; path: string }[]) {
  const literal = new Map<string, Set<string>>();
  for (const { method, path } of routes) {
    if (method === "ALL" || /[:*]/.test(path)) continue;
    literal.set(path, (literal.get(path) ?? new Set()).add(method));
  }
  return literal;
}

function methodNotAllowed(c: Ctx, methods: Set<string>): Response {
  const allow = [...methods, "OPTIONS"].join(", ");
  c.header("allow", allow);
  return c.json(
    errorBody(
      new HttpError(405, "method_not_allowed", `${c.req.method} is not allowed here`, { allow }),
      c.get("correlationId") ?? crypto.randomUUID(),
    ),
    405,
  );
}

/** A Hono app for one function, mounted at /<name> as Supabase routes it. */
export function createApp(name: string): Hono<AppEnv> {
  const app = new Hono<AppEnv>({ getPath: functionPath }).basePath(`/${name}`);

  app.use("*", async (c, next) => {
    const given = c.req.header("x-correlation-id");
    const id = given && CORRELATION_ID.test(given) ? given : crypto.randomUUID();
    c.set("correlationId", id);
    const started = performance.now();
    await next();
    c.header("x-correlation-id", id);
    log("info", "request", {
      fn: name,
      method: c.req.method,
      path: c.req.path,
      status: c.res.status,
      duration_ms: Math.round((performance.now() - started) * 100) / 100,
      correlation_id: id,
      role: c.get("principal")?.role,
    });
  });

  app.use(
    "*",
    cors({
      origin: "*",
      allowMethods: ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
      allowHeaders: [
        "authorization",
        "x-client-info",
        "apikey",
        "content-type",
        "idempotency-key",
        "x-correlation-id",
        // supabase-js sends it with a `region` (the gateway's choice of region)
        "x-region",
      ],
      // a browser's client reads these: the request id, whether a keyed request
      // was a replay, and when to send a 503's request again
      exposeHeaders: ["x-correlation-id", "idempotent-replayed", "retry-after"],
      maxAge: 86400,
    }),
  );

  app.onError((err, c) => {
    const httpError = err instanceof HttpError ? err : toHttpError(err, c.get("correlationId"));
    const res = c.json(
      errorBody(httpError, c.get("correlationId") ?? crypto.randomUUID()),
      httpError.status as 400,
    );
    for (const [k, v] of Object.entries(httpError.headers ?? {})) res.headers.set(k, v);
    return res;
  });

  // A literal path is not a parameter: with POST /jobs/run and GET /jobs/:id,
  // GET /jobs/run is 405, not a lookup of the job "run". The literal routes
  // are read once, after the function has registered them all.
  let literalRoutes: Map<string, Set<string>> | undefined;
  app.use("*", async (c, next) => {
    literalRoutes ??= literalRouteMethods(app.routes);
    const methods = literalRoutes.get(c.req.path);
    const method = c.req.method === "HEAD" ? "GET" : c.req.method;
    if (methods && !methods.has(method)) return methodNotAllowed(c, methods);
    await next();
  });

  app.notFound((c) => {
    const path = c.req.path;
    const allowed = new Set<string>();
    for (const route of app.routes) {
      if (route.method === "ALL") continue;
      if (compileRoute(route.path).test(path)) allowed.add(route.method);
    }
    if (allowed.size > 0) return methodNotAllowed(c, allowed);
    return c.json(
      errorBody(
        new HttpError(404, "not_found", `no route for ${c.req.method} ${path}`),
        c.get("correlationId") ?? crypto.randomUUID(),
      ),
      404,
    );
  });

  return app;
}

/**
 * Reads the raw body, refusing more than `limit` bytes without buffering
 * them (Content-Length is checked first, then the stream as it arrives).
 */
export async function readRawBody(c: Ctx, limit = env().MAX_BODY_BYTES): Promise<Uint8Array> {
  const declared = Number(c.req.header("content-length") ?? "NaN");
  if (Number.isFinite(declared) && declared > limit) throw payloadTooLarge(limit);
  const body = c.req.raw.body;
  if (!body) return new Uint8Array();
  const chunks: Uint8Array[] = [];
  let size = 0;
  const reader = body.getReader();
  for (;;) {
    let chunk: ReadableStreamReadResult<Uint8Array>;
    try {
      chunk = await reader.read();
    } catch {
      // the client went away (or broke its framing) mid-body: its fault, not ours
      throw badRequest("body_incomplete", "the request body ended before it was complete");
    }
    const { done, value } = chunk;
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel().catch(() => {});
      throw payloadTooLarge(limit);
    }
    chunks.push(value);
  }
  if (chunks.length === 1) return chunks[0];
  const out = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return out;
}

/**
 * Parses JSON text; malformed JSON is a 400. `exact` (API bodies) also refuses
 * what JSON.parse would change without a word: a number it would round (see
 * keptAsSent) and a lone UTF-16 surrogate, which Postgres cannot store (a text
 * column would keep U+FFFD in its place). The WhatsApp webhook parses
 * leniently: Meta signed what it sent, and refusing it would lose it.
 */
export function parseJsonText(text: string, { exact = true } = {}): unknown {
  let value: unknown;
  let rounded: string | undefined;
  try {
    value = exact && MAY_ROUND.test(text)
      ? JSON.parse(text, (_key, v, context?: { source?: string }) => {
        if (typeof v === "number" && rounded === undefined && !keptAsSent(context?.source, v)) {
          rounded = context?.source ?? String(v);
        }
        return v;
      })
      : JSON.parse(text);
  } catch {
    throw badRequest("invalid_json", "the request body is not valid JSON");
  }
  if (rounded !== undefined) {
    throw badRequest(
      "inexact_number",
      `the number ${rounded.slice(0, 40)} would not be kept as sent (JSON numbers are read as ` +
        "doubles: an integer must be exact, as up to 2^53 is, other numbers have at most 17 " +
        "significant digits, within 1e308 and not so small they become 0); send it as a string",
    );
  }
  // JSON.parse keeps a "__proto__" key, but copying the object (as zod does)
  // turns it into the copy's prototype: the key would vanish without a word.
  // A key may spell any of its characters as a \u escape ("\u005f_proto__"),
  // and only an escape makes a lone surrogate.
  if (text.includes("__proto__") || text.includes("\\u")) {
    const problem = unkeepableText(value, exact);
    if (problem === "proto") throw badRequest("invalid_json", "the key __proto__ is not accepted");
    if (problem === "surrogate") {
      throw badRequest(
        "invalid_json",
        "the request body has a lone UTF-16 surrogate (\\ud800-\\udfff), which no text can hold",
      );
    }
  }
  return value;
}

// A number that JSON.parse may round has at least 16 significant digits, or
// an exponent of three digits; a body without either takes the fast parse.
const MAY_ROUND = /\d[\d.]{15}|[eE][+-]?\d{3}/;

/**
 * Whether `value`, written back as JSON, is the number the sender wrote as
 * `source`. An integer must come back with the same digits (an id past 2^53
 * would not). Other numbers are taken as doubles if written with at most 17
 * significant digits, as a double's exact spelling needs no more (%.17g
 * writers send 0.1 as 0.10000000000000001); more digits would be cut. Never
 * infinite, nor 0 for a number that is not.
 */
function keptAsSent(source: string | undefined, value: number): boolean {
  const sent = source === undefined ? null : decimalKey(source);
  if (sent === null || !Number.isFinite(value)) return false;
  if (/^-?\d+$/.test(source!)) return sent === decimalKey(String(value));
  const digits = sent.replace(/^-/, "").split("e")[0];
  return (value === 0) === (digits === "0") && digits.length <= 17;
}

/** A decimal as digits and exponent, without leading or trailing zeros ("0" for zero). */
function decimalKey(text: string): string | null {
  const m = /^(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?$/.exec(text);
  if (!m) return null; // Infinity, NaN
  const fraction = m[3] ?? "";
  let digits = (m[2] + fraction).replace(/^0+/, "");
  if (digits === "") return "0";
  let exponent = Number(m[4] ?? 0) - fraction.length;
  const trailing = digits.length - digits.replace(/0+$/, "").length;
  digits = digits.slice(0, digits.length - trailing);
  exponent += trailing;
  return `${m[1]}${digits}e${exponent}`;
}

/** A "__proto__" key, or (with `exact`) a lone surrogate in a key or string, anywhere in `value`. */
function unkeepableText(value: unknown, exact: boolean): "proto" | "surrogate" | null {
  const stack = [value];
  while (stack.length > 0) {
    const v = stack.pop();
    if (typeof v === "string") {
      if (exact && !v.isWellFormed()) return "surrogate";
      continue;
    }
    if (typeof v !== "object" || v === null) continue;
    if (!Array.isArray(v)) {
      if (Object.hasOwn(v, "__proto__")) return "proto";
      // one push each: spreading a long array as arguments overflows the stack
      for (const key of Object.keys(v)) stack.push(key);
    }
    for (const child of Object.values(v)) stack.push(child);
  }
  return null;
}

function validate<S extends z.ZodType>(schema: S, value: unknown, what: string): z.infer<S> {
  const parsed = schema.safeParse(value);
  if (!parsed.success) {
    throw badRequest(
      "invalid_request",
      `the ${what} is invalid`,
      parsed.error.issues.map((i) => ({
        path: i.path.join("."),
        code: i.code,
        message: i.message,
      })),
    );
  }
  return parsed.data;
}

/** Reads, size-checks, parses and validates a JSON body. */
export async function jsonBody<S extends z.ZodType>(c: Ctx, schema: S): Promise<z.infer<S>> {
  const raw = await readRawBody(c);
  let text: string;
  try {
    // JSON is UTF-8; a lenient decoder would store U+FFFD for each bad byte
    text = new TextDecoder("utf-8", { fatal: true }).decode(raw);
  } catch {
    throw badRequest("invalid_json", "the request body is not valid UTF-8");
  }
  if (text.trim() === "") return validate(schema, undefined, "request body");
  return validate(schema, parseJsonText(text), "request body");
}

// Supabase's gateway reads it to pick the region a function runs in
// (supabase-js adds it to every call made with a `region`); it is not ours.
const GATEWAY_QUERY_KEYS = new Set(["forceFunctionRegion"]);

/** Validates the query string: single values, so a repeated key is a 400 (which one would count?). */
export function queryParams<S extends z.ZodType>(c: Ctx, schema: S): z.infer<S> {
  const queries = Object.entries(c.req.queries()).filter(([key]) => !GATEWAY_QUERY_KEYS.has(key));
  const repeated = queries.filter(([, values]) => values.length > 1);
  if (repeated.length > 0) {
    throw badRequest(
      "invalid_request",
      "the query string is invalid",
      repeated.map(([key]) => ({
        path: key,
        code: "repeated",
        message: "give this parameter once",
      })),
    );
  }
  return validate(
    schema,
    Object.fromEntries(queries.map(([key, values]) => [key, values[0]])),
    "query string",
  );
}

/**
 * A request header as the text the client sent. Deno hands a header's bytes
 * over one character per byte; a value that is valid UTF-8 (a user agent
 * naming "CaféApp") is read as such, any other as the bytes it is.
 */
export function headerText(c: Ctx, name: string): string | undefined {
  const raw = c.req.header(name);
  if (raw === undefined || !/[\x80-\xff]/.test(raw) || /[\u0100-\uffff]/.test(raw)) return raw;
  try {
    return new TextDecoder("utf-8", { fatal: true })
      .decode(Uint8Array.from(raw, (ch) => ch.charCodeAt(0)));
  } catch {
    return raw;
  }
}

/** Validates path parameters. */
export function pathParams<S extends z.ZodType>(c: Ctx, schema: S): z.infer<S> {
  return validate(schema, c.req.param(), "path");
}

/** Opaque keyset cursors: base64url JSON, validated on the way back in. */
export function encodeCursor(value: unknown): string {
  return btoa(JSON.stringify(value)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * One page of a keyset listing. Callers fetch `limit + 1` rows: the extra row
 * only tells that there is more, and the cursor is taken from the last row
 * kept.
 */
export function keysetPage<R, T>(
  rows: readonly R[],
  limit: number,
  cursorOf: (last: R) => unknown,
  toJson: (row: R) => T,
): { data: T[]; next_cursor: string | null } {
  const kept = rows.slice(0, limit);
  return {
    data: kept.map(toJson),
    next_cursor: rows.length > limit ? encodeCursor(cursorOf(kept[kept.length - 1])) : null,
  };
}

export function decodeCursor<S extends z.ZodType>(cursor: string, schema: S): z.infer<S> {
  try {
    const json = atob(cursor.replace(/-/g, "+").replace(/_/g, "/"));
    const parsed = schema.safeParse(JSON.parse(json));
    if (parsed.success) return parsed.data;
  } catch {
    // fall through to the 400 below
  }
  throw badRequest("invalid_cursor", "the cursor is not one this API issued");
}

/** Lets slow work finish after the response (EdgeRuntime.waitUntil on Supabase). */
export function runInBackground(work: Promise<unknown>, correlationId?: string): void {
  const guarded = work.catch((err) =>
    log("error", "background work failed", { correlation_id: correlationId, error: String(err) })
  );
  const runtime =
    (globalThis as { EdgeRuntime?: { waitUntil(p: Promise<unknown>): void } }).EdgeRuntime;
  runtime?.waitUntil(guarded);
}

const IDEMPOTENCY_KEY = /^[\x21-\x7e]+$/;

export interface IdempotencyKeyOptions {
  /** A missing header is a 400 too. */
  required?: boolean;
  /**
   * Longest key accepted. 256 is what the jobs, queues and WhatsApp tables
   * store; a function whose SQL allows fewer passes its own limit, so the
   * caller hears about a long key here rather than from the database.
   */
  max?: number;
}

/**
 * The Idempotency-Key header (1 to `max`, by default 256, visible ASCII
 * characters; anything else is a 400).
 */
export function idempotencyKeyHeader(
  c: Ctx,
  opts: IdempotencyKeyOptions & { required: true },
): string;
export function idempotencyKeyHeader(c: Ctx, opts?: IdempotencyKeyOptions): string | undefined;
export function idempotencyKeyHeader(
  c: Ctx,
  opts: IdempotencyKeyOptions = {},
): string | undefined {
  const key = c.req.header("idempotency-key");
  if (key === undefined) {
    if (opts.required) {
      throw badRequest("idempotency_key_required", "send an Idempotency-Key header");
    }
    return undefined;
  }
  const max = opts.max ?? 256;
  if (key.length > max || !IDEMPOTENCY_KEY.test(key)) {
    throw badRequest(
      "invalid_idempotency_key",
      `Idempotency-Key must be 1-${max} visible ASCII characters`,
    );
  }
  return key;
}

/**
 * The key of a create that takes it in the body or in the Idempotency-Key
 * header: the header is checked either way, and the two must agree (a
 * silently ignored key would leave a retry unkeyed).
 */
export function idempotencyKeyOf(c: Ctx, bodyKey: string | undefined): string | undefined {
  const header = idempotencyKeyHeader(c);
  if (header !== undefined && bodyKey !== undefined && header !== bodyKey) {
    throw badRequest(
      "idempotency_key_mismatch",
      "the Idempotency-Key header and the body's idempotency_key differ: send one, or the same",
    );
  }
  return bodyKey ?? header;
}

/**
 * The answer to an idempotent create: 201 when this request created the
 * resource, 200 with `idempotent-replayed: true` when an earlier request with
 * the same key had (the body is that earlier resource).
 */
export function createdOrReplayed(c: Ctx, body: unknown, created: boolean): Response {
  if (!created) c.header("idempotent-replayed", "true");
  return c.json(body as object, created ? 201 : 200);
}
