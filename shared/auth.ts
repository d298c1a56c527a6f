// Bearer JWT verification with jose, the way Supabase's gateway does it:
// HS256 with the project's JWT secret, or a JWKS for asymmetric signing keys.
// Supabase's API keys (sb_secret_..., sb_publishable_...) are accepted as the
// service role and anon. The role comes from the token; handlers ask for the
// role they need.
import {
  createLocalJWKSet,
  decodeProtectedHeader,
  errors as joseErrors,
  type JWTPayload,
  jwtVerify,
} from "jose";
import type { MiddlewareHandler } from "hono";
import { env } from "./env.ts";
import { forbidden, tryAgain, unauthorized } from "./errors.ts";
import type { AppEnv, Ctx } from "./http.ts";
import { log } from "./log.ts";

export type Role = "anon" | "authenticated" | "service_role";

export interface Principal {
  role: Role;
  /** The user id (`sub`) for authenticated users. */
  userId?: string;
  claims: JWTPayload & Record<string, unknown>;
}

const ROLES = new Set<Role>(["anon", "authenticated", "service_role"]);
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

type KeySet = ReturnType<typeof createLocalJWKSet>;
interface Keys {
  secret?: CryptoKey;
  /** SUPABASE_JWKS: fixed for the isolate's life, as the secret is */
  jwks?: KeySet;
  /** JWKS_URL: read again as it ages */
  remote?: RemoteKeySet;
  /** SHA-256 (hex) of each API key -> the role it speaks for */
  apiKeys: Map<string, Role>;
}
let keyCache: Promise<Keys> | undefined;

// The HMAC key is imported once per isolate, not on every verification.
function keys(): Promise<Keys> {
  // a failed load is not kept: the next request tries again
  keyCache ??= loadKeys().catch((err) => {
    keyCache = undefined;
    throw err;
  });
  return keyCache;
}

async function loadKeys(): Promise<Keys> {
  const e = env();
  const apiKeys = new Map<string, Role>();
  for (const key of e.SUPABASE_SECRET_KEYS) apiKeys.set(await sha256(key), "service_role");
  for (const key of e.SUPABASE_PUBLISHABLE_KEYS) apiKeys.set(await sha256(key), "anon");
  return {
    secret: e.JWT_SECRET
      ? await crypto.subtle.importKey(
        "raw",
        new TextEncoder().encode(e.JWT_SECRET),
        { name: "HMAC", hash: "SHA-256" },
        false,
        ["verify"],
      )
      : undefined,
    jwks: e.SUPABASE_JWKS ? createLocalJWKSet(JSON.parse(e.SUPABASE_JWKS)) : undefined,
    remote: !e.SUPABASE_JWKS && e.JWKS_URL
      ? new RemoteKeySet(new URL(e.JWKS_URL), e.JWKS_MAX_AGE_SECONDS * 1000)
      : undefined,
    apiKeys,
  };
}

/**
 * The key set could not be used (a key in it that cannot be imported): the
 * server's fault, not the token's. A 401 would tell a client to drop a good
 * session; a 503 tells it to try again.
 */
function keySetUnavailable(err: unknown): boolean {
  return err instanceof joseErrors.JWKSTimeout || err instanceof joseErrors.JWKSInvalid ||
    (err instanceof joseErrors.JOSEError && err.code === "ERR_JOSE_GENERIC") ||
    err instanceof TypeError;
}

// ---------------------------------------------------------------------------
// JWKS_URL
// ---------------------------------------------------------------------------

const JWKS_TIMEOUT_MS = 5_000;
/** Tokens naming a kid the set lacks read it again at most this often (as jose's default). */
const JWKS_COOLDOWN_MS = 30_000;

/** A key set as JWKS_URL served it, and when it was asked for. */
interface ReadKeySet {
  at: number;
  keys: KeySet;
}

/**
 * The key set behind JWKS_URL. jose's createRemoteJWKSet keeps a set for ten
 * minutes and does not tell when it read it; here each read's time is known,
 * so a token is remembered no longer than the set that verified it is trusted
 * (JWKS_MAX_AGE_SECONDS), and a key taken out of the set is refused within
 * that time. One read at a time; a failed read is not kept (the next request
 * reads again) and a stale set is never used: 503 until the URL answers.
 */
class RemoteKeySet {
  #current?: ReadKeySet;
  #pending?: Promise<ReadKeySet>;

  constructor(readonly url: URL, readonly maxAgeMs: number) {}

  /** The set, read again once it is maxAgeMs old. */
  fresh(): Promise<ReadKeySet> {
    const current = this.#current;
    return current && Date.now() - current.at < this.maxAgeMs
      ? Promise.resolve(current)
      : this.#read();
  }

  /**
   * For a token whose kid `seen` lacks: a set read since, or one read now
   * unless `seen` is younger than the cooldown (made-up kids must not turn
   * every request into a read); undefined when there is none.
   */
  async newer(seen: ReadKeySet): Promise<ReadKeySet | undefined> {
    if (this.#current && this.#current !== seen) return this.#current;
    if (Date.now() - seen.at < Math.min(JWKS_COOLDOWN_MS, this.maxAgeMs)) return undefined;
    return await this.#read();
  }

  #read(): Promise<ReadKeySet> {
    this.#pending ??= readKeySet(this.url)
      .then((read) => (this.#current = read))
      .finally(() => (this.#pending = undefined));
    return this.#pending;
  }
}

/**
 * Unreachable, not 200, not a key set, too slow: the server's fault, not the
 * token's, so 503 auth_unavailable (see keySetUnavailable). Redirects are not
 * followed, as jose does not follow them.
 */
async function readKeySet(url: URL): Promise<ReadKeySet> {
  // the set speaks for the URL from the moment it was asked for
  const at = Date.now();
  try {
    const res = await fetch(url, {
      redirect: "manual",
      headers: { accept: "application/jwk-set+json, application/json" },
      signal: AbortSignal.timeout(JWKS_TIMEOUT_MS),
    });
    if (res.status !== 200) {
      await res.body?.cancel();
      throw new Error(`answered HTTP ${res.status}`);
    }
    return { at, keys: createLocalJWKSet(await res.json()) };
  } catch (err) {
    log("warn", "JWKS_URL could not be read", { error: String(err) });
    throw tryAgain("auth_unavailable", "the signing keys could not be fetched; try again");
  }
}

/** Verifies with the remote set, reading it again for an unknown kid; says until when the answer holds. */
async function verifyRemote(
  token: string,
  remote: RemoteKeySet,
): Promise<{ payload: JWTPayload; trustedUntil: number }> {
  const withSet = async (set: ReadKeySet) => ({
    payload: await verifyAsymmetric(token, set.keys),
    trustedUntil: set.at + remote.maxAgeMs,
  });
  const set = await remote.fresh();
  try {
    return await withSet(set);
  } catch (err) {
    if (!(err instanceof joseErrors.JWKSNoMatchingKey)) throw err;
    const newer = await remote.newer(set);
    if (!newer) throw err;
    return await withSet(newer);
  }
}

async function verifyAsymmetric(token: string, keys: KeySet): Promise<JWTPayload> {
  const { payload } = await jwtVerify(token, keys, {
    algorithms: ["RS256", "ES256", "EdDSA"],
    requiredClaims: ["exp"],
  });
  return payload;
}

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

// Keys are compared by their hashes, so the time a comparison takes says
// nothing about how much of a guess matched.
async function apiKeyPrincipal(token: string): Promise<Principal> {
  const role = (await keys()).apiKeys.get(await sha256(token));
  if (!role) throw unauthorized("invalid_token", "the API key is not one of this project's keys");
  return { role, claims: { role } };
}

/** Forget derived keys (tests rotate the secret). */
export function resetAuth(): void {
  keyCache = undefined;
  verified.clear();
}

// Clients reuse one token for many calls; a verified token is remembered
// (bounded) so the signature is checked once: never past its expiry, nor,
// for JWKS_URL, past the life of the key set that verified it. The secret, the
// API keys and SUPABASE_JWKS change only with the isolate, which starts with
// an empty cache.
const VERIFIED_MAX = 1000;
const verified = new Map<string, { principal: Principal; expiresAt: number }>();

/** Verifies a compact JWT or an API key and returns who it speaks for; throws 401 otherwise. */
export async function verifyToken(token: string): Promise<Principal> {
  if (token.startsWith("sb_")) return await apiKeyPrincipal(token);
  const hit = verified.get(token);
  if (hit) {
    if (Date.now() < hit.expiresAt) return hit.principal;
    verified.delete(token);
  }
  const { principal, trustedUntil } = await verifyUncached(token);
  // jose has checked that exp is there and is a number (requiredClaims).
  const expiresAt = Math.min(principal.claims.exp! * 1000, trustedUntil);
  if (verified.size >= VERIFIED_MAX) verified.delete(verified.keys().next().value!);
  verified.set(token, { principal, expiresAt });
  return principal;
}

async function verifyUncached(
  token: string,
): Promise<{ principal: Principal; trustedUntil: number }> {
  let alg: string | undefined;
  try {
    alg = decodeProtectedHeader(token).alg;
  } catch {
    throw unauthorized("invalid_token", "the bearer token is not a JWT");
  }
  const { secret, jwks, remote } = await keys();
  const asymmetric = alg === "RS256" || alg === "ES256" || alg === "EdDSA";
  let payload: JWTPayload;
  let trustedUntil = Infinity;
  try {
    if (alg === "HS256" && secret) {
      ({ payload } = await jwtVerify(token, secret, {
        algorithms: ["HS256"],
        requiredClaims: ["exp"],
      }));
    } else if (jwks && asymmetric) {
      payload = await verifyAsymmetric(token, jwks);
    } else if (remote && asymmetric) {
      ({ payload, trustedUntil } = await verifyRemote(token, remote));
    } else {
      throw unauthorized(
        "invalid_token",
        `tokens signed with ${alg ?? "no algorithm"} are not accepted`,
      );
    }
  } catch (err) {
    if (err instanceof joseErrors.JWTExpired) {
      throw unauthorized("token_expired", "the bearer token has expired");
    }
    if (err instanceof Error && err.name === "HttpError") throw err;
    if (keySetUnavailable(err)) {
      throw tryAgain("auth_unavailable", "the signing keys could not be fetched; try again");
    }
    throw unauthorized("invalid_token", "the bearer token could not be verified");
  }
  const role = payload.role;
  if (typeof role !== "string" || !ROLES.has(role as Role)) {
    throw unauthorized("invalid_token", "the bearer token carries no known role");
  }
  if (role === "authenticated" && (typeof payload.sub !== "string" || !UUID.test(payload.sub))) {
    throw unauthorized("invalid_token", "a user token must carry a user id in sub");
  }
  // Supabase Auth issues user tokens for the audience "authenticated": one
  // signed with the project's key for another audience is not a session here.
  // (The anon and service_role keys carry no audience.)
  const audiences = Array.isArray(payload.aud) ? payload.aud : [payload.aud];
  if (role === "authenticated" && !audiences.includes("authenticated")) {
    throw unauthorized("invalid_token", "a user token must be for the audience authenticated");
  }
  const principal: Principal = {
    role: role as Role,
    userId: role === "authenticated" ? payload.sub : undefined,
    claims: payload as Principal["claims"],
  };
  return { principal, trustedUntil };
}

function bearer(c: Ctx): string | undefined {
  const header = c.req.header("authorization");
  if (!header) return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (!match) {
    throw unauthorized("invalid_token", "Authorization must be 'Bearer <jwt or API key>'");
  }
  return match[1];
}

/** Middleware: every request must carry a valid JWT; the principal is stored on the context. */
export function authenticate(): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const token = bearer(c);
    if (!token) throw unauthorized("missing_token", "an Authorization bearer token is required");
    c.set("principal", await verifyToken(token));
    await next();
  };
}

export function principal(c: Ctx): Principal {
  const p = c.get("principal");
  if (!p) throw unauthorized("missing_token", "an Authorization bearer token is required");
  return p;
}

/** The service role (backends, cron). */
export function requireService(c: Ctx): Principal {
  const p = principal(c);
  if (p.role === "anon") throw unauthorized("login_required", "a service_role token is required");
  if (p.role !== "service_role") throw forbidden("only the service role may do this");
  return p;
}

/** A signed-in user or the service role; anon is refused. */
export function requireUserOrService(c: Ctx): Principal {
  const p = principal(c);
  if (p.role === "anon") throw unauthorized("login_required", "sign in to do this");
  return p;
}
