-- HS256 JWT: the web app signs a short-lived token per request or session; moongate checks it.
--
--   MOONGATE_JWT_SECRET   the shared HMAC secret (required)
--   MOONGATE_JWT_ISSUER   if set, the "iss" claim must equal it
--
-- The user is the "sub" claim. moongate.jwt_verify checks the signature in constant time, and
-- "exp" and "nbf" when present; this policy also requires "exp", so no token lives forever.
local mg = require "moongate"

local secret = mg.env("MOONGATE_JWT_SECRET")
if not secret or #secret < 32 then
  error("MOONGATE_JWT_SECRET must be set to at least 32 characters", 0)
end
local issuer = mg.env("MOONGATE_JWT_ISSUER")

local challenge = { ["www-authenticate"] = 'Bearer realm="moongate", error="invalid_token"' }

return {
  authenticate = function(req)
    local h = req.headers.authorization
    local token = h and h:match("^[Bb]earer%s+(%S+)%s*$")
    if not token then
      return nil, 401, "missing bearer token", challenge
    end
    local claims, why = mg.jwt_verify(token, secret, { leeway = 30 })
    if not claims then
      return nil, 401, "invalid token: " .. why, challenge
    end
    if type(claims.exp) ~= "number" then
      return nil, 401, "invalid token: no exp", challenge
    end
    if issuer and claims.iss ~= issuer then
      return nil, 401, "invalid token: wrong issuer", challenge
    end
    if type(claims.sub) ~= "string" then
      return nil, 401, "invalid token: no sub", challenge
    end
    return claims.sub
  end,
}
