-- Static tokens: every user has a fixed bearer token.
--
--   curl -H 'Authorization: Bearer alice-token-change-me' http://gateway/api/generate ...
--
-- The table is indexed by the tokens' SHA-256 digests, so a lookup compares digests, never the
-- secrets themselves. In production, keep the tokens out of the file: read them with
-- moongate.env() or from a file only root can read.
local mg = require "moongate"

local tokens = {
  alice = "alice-token-change-me",
  bob = "bob-token-change-me",
}

local user_by_digest = {}
for user, token in pairs(tokens) do
  user_by_digest[mg.sha256(token)] = user
end

local challenge = { ["www-authenticate"] = 'Bearer realm="moongate"' }

return {
  authenticate = function(req)
    local h = req.headers.authorization
    local token = h and h:match("^[Bb]earer%s+(%S+)%s*$")
    local user = token and user_by_digest[mg.sha256(token)]
    if not user then
      return nil, 401, "invalid or missing token", challenge
    end
    return user
  end,
}
