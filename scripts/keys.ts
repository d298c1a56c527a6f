// The local stack's API keys: anon and service_role JWTs signed with the
// local JWT secret, long-lived like the ones `supabase start` prints.
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
