// Bearer JWT verification with jose, the way Supabase's gateway does it:
// HS256 with the project's JWT secret, or a JWKS for asymmetric signing keys.
// Supabase's API keys (sb_secret_..., sb_publishable_...) are accepted as the
// service role and anon. The role comes from the token; handlers ask for the
// role they need.
import {
  createLocalJWKSet,
  createRemoteJWKSet,
  decodeProtectedHeader,
  errors as joseErrors,
  type JWTPayload,
  jwtVerify,
} from "jose";
import type { MiddlewareHandler } from "hono";
import { env } from "./env.ts";
import { forbidden, tryAgain, unauthorized } from "./errors.ts";
import type { AppEnv, Ctx } from "./http.ts";

export type Role = "anon" | "authenticated" | "service_role";

export interface Principal {
  role: Role;
  /** The user id (`sub`) for authenticated users. */
  userId?: string;
  claims: JWTPayload & Record<string, unknown>;
}

const ROLES = new Set<Role>(["anon", "authenticated", "service_role"]);
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

type KeySet = ReturnType<typeof createLocalJWKSet> | ReturnType<typeof createRemoteJWKSet>;
interface Keys {
  secret?: CryptoKey;
  jwks?: KeySet;
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
    jwks: e.SUPABASE_JWKS
      ? createLocalJWKSet(JSON.parse(e.SUPABASE_JWKS))
      : e.JWKS_URL
      ? createRemoteJWKSet(new URL(e.JWKS_URL))
      : undefined,
    apiKeys,
  };
}

/**
 * JWKS_URL could not be fetched or read (unreachable, not 200, not a key set,
 * too slow): the server's fault, not the token's. A 401 would tell a client to
 * drop a good session; a 503 tells it to try again.
 */
function keySetUnavailable(err: unknown): boolean {
  return err instanceof joseErrors.JWKSTimeout || err instanceof joseErrors.JWKSInvalid ||
    (err instanceof joseErrors.JOSEError && err.code === "ERR_JOSE_GENERIC") ||
    err instanceof TypeError; // fetch's network failure
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
// (bounded, and never past its expiry) so the signature is checked once.
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
  const principal = await verifyUncached(token);
  // jose has checked that exp is there and is a number (requiredClaims).
  const expiresAt = principal.claims.exp! * 1000;
  if (verified.size >= VERIFIED_MAX) verified.delete(verified.keys().next().value!);
  verified.set(token, { principal, expiresAt });
  return principal;
}

async function verifyUncached(token: string): Promise<Principal> {
  let alg: string | undefined;
  try {
    alg = decodeProtectedHeader(token).alg;
  } catch {
    throw unauthorized("invalid_token", "the bearer token is not a JWT");
  }
  const { secret, jwks } = await keys();
  let payload: JWTPayload;
  try {
    if (alg === "HS256" && secret) {
      ({ payload } = await jwtVerify(token, secret, {
        algorithms: ["HS256"],
        requiredClaims: ["exp"],
      }));
    } else if (jwks && (alg === "RS256" || alg === "ES256" || alg === "EdDSA")) {
      ({ payload } = await jwtVerify(token, jwks, {
        algorithms: ["RS256", "ES256", "EdDSA"],
        requiredClaims: ["exp"],
      }));
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
  return {
    role: role as Role,
    userId: role === "authenticated" ? payload.sub : undefined,
    claims: payload as Principal["claims"],
  };
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
