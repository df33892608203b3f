-- Ollama on the user's machine (ollama serve, 127.0.0.1:11434).
--
-- What Ollama needs from the gateway:
--   - no Origin: a browser's request through the web app carries one, and Ollama answers 403 to
--     an origin OLLAMA_ORIGINS does not list. The gateway is the client here: drop it (Referer
--     too, which says where the user was).
--   - a Host it accepts: bound to loopback, Ollama serves only Host names of its own machine
--     (localhost, 127.0.0.1, ...). The route names one, whatever target_host says.
--   - time: the first request after a model was unloaded waits for it to load, minutes for a
--     large one, before the first byte. A stream that then stops for two minutes is dead.
-- Ollama has no key of its own: the gateway's credential is removed as always.
--
-- Authentication is the default one (bearer tokens from MOONGATE_TOKENS); the SSH connection
-- is the default route's (MOONGATE_SSH_*).
local default = require "moongate.default"

local route = default.route_with{
  target_host = "127.0.0.1",
  target_port = 11434,
  host_header = "localhost:11434",
  headers = { origin = false, referer = false },
  head_timeout_ms = 600000, -- a cold load of a 70B model
  idle_timeout_ms = 120000,
  error_format = "ollama",
}

return {
  authenticate = default.authenticate,
  route = function(req, user)
    return route
  end,
}
