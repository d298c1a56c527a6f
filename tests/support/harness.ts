// Test harness: a fresh database per test file (cloned from the migrated
// template), signed tokens for every role, users, and the local API over
// real HTTP. Used by every file in tests/functions.
import postgres from "postgres";
import { SignJWT } from "jose";
import { closeDb } from "../../shared/db.ts";
import { resetEnv } from "../../shared/env.ts";
import { resetAuth } from "../../shared/auth.ts";
import { createRouter, loadFunctions } from "../../scripts/router.ts";

export const TEST_JWT_SECRET = "test-secret-for-easymo-tests-only-0123456789abcdef";
/** The test cluster's maintenance database (where pg_cron lives). */
export const ADMIN_URL = Deno.env.get("TEST_DATABASE_URL") ??
  "postgresql://postgres:postgres@127.0.0.1:54322/postgres";
const TEMPLATE = Deno.env.get("TEST_TEMPLATE_DB") ?? "easymo_template";

export type Sql = postgres.Sql;

export interface TestDb {
  name: string;
  url: string;
  /** superuser connection to the test database (fixtures and inspection) */
  sql: Sql;
}

function urlFor(name: string): string {
  const url = new URL(ADMIN_URL);
  url.pathname = `/${name}`;
  return url.toString();
}

/** Clones the template into a new database, points the functions at it and returns it. */
export async function freshDatabase(): Promise<TestDb> {
  const name = `t_${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(`create database ${name} template ${TEMPLATE}`);
  } finally {
    await admin.end();
  }
  const url = urlFor(name);
  await useDatabase(url);
  return { name, url, sql: postgres(url, { max: 20, onnotice: () => {}, prepare: false }) };
}

/** Configures the shared modules for tests: this database, the test JWT secret, quiet logs. */
export async function useDatabase(url: string): Promise<void> {
  await closeDb();
  Deno.env.set("SUPABASE_DB_URL", url);
  Deno.env.set("JWT_SECRET", TEST_JWT_SECRET);
  Deno.env.delete("SUPABASE_JWKS");
  Deno.env.delete("JWKS_URL");
  Deno.env.set("LOG_LEVEL", Deno.env.get("TEST_LOG_LEVEL") ?? "silent");
  resetEnv();
  resetAuth();
}

export interface TokenOptions {
  sub?: string;
  /** seconds from now; null for a token without exp */
  expiresIn?: number | null;
  secret?: string;
  extra?: Record<string, unknown>;
}

export async function signToken(role: string, opts: TokenOptions = {}): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  const jwt = new SignJWT({ role, ...opts.extra })
    .setProtectedHeader({ alg: "HS256", typ: "JWT" })
    .setIssuedAt(now);
  if (opts.expiresIn !== null) jwt.setExpirationTime(now + (opts.expiresIn ?? 3600));
  if (opts.sub) jwt.setSubject(opts.sub);
  return await jwt.sign(new TextEncoder().encode(opts.secret ?? TEST_JWT_SECRET));
}

export const serviceToken = () => signToken("service_role");
export const anonToken = () => signToken("anon");
export const userToken = (id: string, extra: Record<string, unknown> = {}) =>
  signToken("authenticated", { sub: id, extra: { aud: "authenticated", ...extra } });

/** Creates a user in auth.users and returns its id. */
export async function createUser(db: TestDb, phone?: string): Promise<string> {
  const id = crypto.randomUUID();
  await db.sql`insert into auth.users (id, email, phone, phone_confirmed_at, role, aud)
               values (${id}, ${id + "@test.local"}, ${phone ?? null},
                       ${phone ? new Date() : null}, 'authenticated', 'authenticated')`;
  return id;
}

type App = { request: (input: string, init?: RequestInit) => Response | Promise<Response> };

/** Calls an app in-process with a bearer token and optional JSON body. */
export async function call(
  app: App,
  method: string,
  path: string,
  opts: { token?: string; body?: unknown; headers?: Record<string, string> } = {},
  // deno-lint-ignore no-explicit-any
): Promise<{ status: number; body: any; headers: Headers }> {
  const headers: Record<string, string> = { ...opts.headers };
  if (opts.token) headers.authorization = `Bearer ${opts.token}`;
  let body: string | undefined;
  if (opts.body !== undefined) {
    body = typeof opts.body === "string" ? opts.body : JSON.stringify(opts.body);
    headers["content-type"] ??= "application/json";
  }
  const res = await app.request(path, { method, headers, body });
  const text = await res.text();
  let parsed: unknown = text;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    // keep the text
  }
  return { status: res.status, body: parsed, headers: res.headers };
}

/** Serves every function like `npm start` does, on an ephemeral port. */
export async function startLocalApi(): Promise<{ url: string; close: () => Promise<void> }> {
  const apps = await loadFunctions();
  const controller = new AbortController();
  let port = 0;
  const server = Deno.serve(
    {
      hostname: "127.0.0.1",
      port: 0,
      signal: controller.signal,
      onListen: (addr) => {
        port = addr.port;
      },
    },
    createRouter(apps),
  );
  return {
    url: `http://127.0.0.1:${port}`,
    close: async () => {
      controller.abort();
      await server.finished;
    },
  };
}

/** Deno.test for tests that hold pooled connections across cases. */
export function dbTest(name: string, fn: () => Promise<void>): void {
  Deno.test({ name, fn, sanitizeOps: false, sanitizeResources: false });
}

/** Asserts the project's error shape and returns the error. */
export function expectError(
  // deno-lint-ignore no-explicit-any
  res: { status: number; body: any },
  status: number,
  code?: string,
): { code: string; message: string; details: unknown } {
  if (res.status !== status) {
    throw new Error(`expected HTTP ${status}, got ${res.status}: ${JSON.stringify(res.body)}`);
  }
  const err = res.body?.error;
  // the one shape, every key present and no other (details null when there are none)
  const keys = (o: object) => Object.keys(o).sort().join(",");
  if (
    !err || typeof err !== "object" || keys(res.body) !== "correlation_id,error" ||
    keys(err) !== "code,details,message" || typeof err.code !== "string" ||
    typeof err.message !== "string" || err.details === undefined
  ) {
    throw new Error(`not the error shape: ${JSON.stringify(res.body)}`);
  }
  if (typeof res.body.correlation_id !== "string") {
    throw new Error(`error without correlation_id: ${JSON.stringify(res.body)}`);
  }
  if (code && err.code !== code) {
    throw new Error(`expected error code ${code}, got ${err.code}: ${JSON.stringify(res.body)}`);
  }
  return err;
}

/** Two free local ports. */
export function freePorts(): [number, number] {
  const a = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const b = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const ports: [number, number] = [(a.addr as Deno.NetAddr).port, (b.addr as Deno.NetAddr).port];
  a.close();
  b.close();
  return ports;
}
