// The local stack's API keys: anon and service_role JWTs signed with the
// local JWT secret, long-lived like the ones `supabase start` prints, or the
// keys given when tokens are verified with a JWKS.
import { SignJWT } from "jose";

/** Supabase CLI's well-known local secret; never use it for a hosted project. */
export const LOCAL_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long";

export async function signKey(role: "anon" | "service_role", secret: string): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  return await new SignJWT({ role })
    .setProtectedHeader({ alg: "HS256", typ: "JWT" })
    .setIssuer("supabase-demo")
    .setIssuedAt(now)
    .setExpirationTime(now + 10 * 365 * 24 * 3600)
    .sign(new TextEncoder().encode(secret));
}

/** What the local stack's keys are made from: the validated configuration, and the two key variables as given. */
export interface KeyConfig {
  JWT_SECRET?: string;
  SUPABASE_JWKS?: string;
  JWKS_URL?: string;
  SUPABASE_SECRET_KEYS: string[];
  SUPABASE_PUBLISHABLE_KEYS: string[];
  /** SUPABASE_ANON_KEY */
  anonKey?: string;
  /** SUPABASE_SERVICE_ROLE_KEY */
  serviceRoleKey?: string;
}

export interface StackKeys {
  /** the banner's "JWT secret" */
  secret: string;
  /** the banner's "JWKS": where asymmetric tokens are verified, when they are */
  jwks?: string;
  anon?: string;
  /** the service role's key: the banner prints it and the scheduler calls with it */
  service?: string;
  /** the variable the service role's key comes from, for messages about it */
  serviceFrom?: "SUPABASE_SERVICE_ROLE_KEY" | "JWT_SECRET" | "SUPABASE_SECRET_KEYS";
}

/**
 * The keys the local stack prints and calls with: SUPABASE_ANON_KEY and
 * SUPABASE_SERVICE_ROLE_KEY as given, else legacy JWTs signed with JWT_SECRET,
 * else the project's first publishable and secret API keys. With only a JWKS
 * nothing can be signed here (its private keys are Supabase's), so a key must
 * be given; undefined says there is none.
 */
export async function stackKeys(c: KeyConfig): Promise<StackKeys> {
  const secret = c.JWT_SECRET;
  const signed = async (role: "anon" | "service_role") =>
    secret ? await signKey(role, secret) : undefined;
  const service = c.serviceRoleKey
    ? { service: c.serviceRoleKey, serviceFrom: "SUPABASE_SERVICE_ROLE_KEY" as const }
    : secret
    ? { service: await signed("service_role"), serviceFrom: "JWT_SECRET" as const }
    : c.SUPABASE_SECRET_KEYS.length
    ? { service: c.SUPABASE_SECRET_KEYS[0], serviceFrom: "SUPABASE_SECRET_KEYS" as const }
    : {};
  return {
    secret: secret === LOCAL_JWT_SECRET
      ? LOCAL_JWT_SECRET
      : secret
      ? "(from JWT_SECRET)"
      : "none (tokens are verified with the JWKS only)",
    // shared/auth.ts prefers SUPABASE_JWKS when both are set
    jwks: c.SUPABASE_JWKS ? "(from SUPABASE_JWKS)" : c.JWKS_URL,
    anon: c.anonKey ?? await signed("anon") ?? c.SUPABASE_PUBLISHABLE_KEYS[0],
    ...service,
  };
}
