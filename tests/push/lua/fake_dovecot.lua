-- A fake Dovecot push driver for running mailhub-push.lua under plain Lua 5.4.
--
--   lua5.4 fake_dovecot.lua SCRIPT SCENARIO
--
-- SCENARIO is a Lua file returning
--
--   {version = "2.4" | "2.3",
--    settings = {mailhub_push_url = ..., ...},  -- 2.4 lua_settings, 2.3 plugin { }
--    responses = {200, 503, ...},               -- HTTP status per request (default 200)
--    transactions = {{user = "alice", success = true,
--                     events = {{name = "MessageNew", mailbox = "INBOX", uid = 1, ...}}}}}
--
-- It does what Dovecot's push-notification-driver-lua.c and dlua-dovecot-http.c
-- do, in the shape of the version asked for (read from dovecot/core 2.3.19 and
-- 2.4.2):
--
-- * 2.4: script_init(lua_settings) is called with a table of strings (an
--   empty one when there are none) and what it returns is ignored; the mail
--   user has no plugin_getenv; dovecot.http.client takes the http_client_*
--   settings without their prefix, refuses unknown ones ("X is unknown
--   setting"), and durations must carry a unit.
-- * 2.3: script_init() gets no argument and must return the integer 0;
--   mail_user:plugin_getenv(name) reads the plugin settings; the client reads
--   the keys it knows (request_timeout_msecs, max_attempts, ...) as numbers.
-- * both: one Lua table per event with name, mailbox and, for message
--   events, uid and uid_validity as floats (lua_pushnumber); a function is
--   called only if the script defines it; errors in the script's functions are
--   logged and the transaction goes on, as Dovecot's dlua_pcall does; Basic
--   credentials in a request's URL become its Authorization header.
--
-- Dovecot loads the script (and calls script_init) for each mail user; the
-- fake loads it once per run, and runs every transaction of the scenario in it.
--
-- Output, one record per line, every value hex-encoded so any byte survives:
--   option KEY VALUE      an option given to dovecot.http.client
--   request               a submitted request starts
--   method|url|header|body VALUE
--   userinfo VALUE        "user:password" of the URL, sent as Basic auth
--   log LEVEL MESSAGE     dovecot.i_* calls and Lua errors (level "error")

local script_path, scenario_path = arg[1], arg[2]
local scenario = dofile(scenario_path)
local version = scenario.version or "2.4"
local settings = scenario.settings or {}
local responses = scenario.responses or {}

local function hex(s)
  return (tostring(s):gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local function out(...)
  local parts = {...}
  for i = 2, #parts do
    parts[i] = hex(parts[i])
  end
  io.write(table.concat(parts, " "), "\n")
end

local function log(level)
  return function(message)
    out("log", level, message)
  end
end

-- dovecot.http --------------------------------------------------------------

local V24_KEYS = {  -- src/lib-http/http-client-settings.c, without http_client_
  user_agent = "string", proxy_socket_path = "string", proxy_url = "string",
  proxy_username = "string", proxy_password = "string", rawlog_dir = "string",
  max_idle_time = "msecs", max_parallel_connections = "uint",
  max_pipelined_requests = "uint", auto_redirect = "bool", auto_retry = "bool",
  proxy_ssl_tunnel = "bool", request_max_redirects = "uint",
  request_max_attempts = "uint", read_request_max_attempts = "uint",
  write_request_max_attempts = "uint", delete_request_max_attempts = "uint",
  max_connect_attempts = "uint", connect_backoff_time = "msecs",
  connect_backoff_max_time = "msecs", request_absolute_timeout = "msecs",
  request_timeout = "msecs", read_request_timeout = "msecs",
  write_request_timeout = "msecs", delete_request_timeout = "msecs",
  connect_timeout = "msecs", soft_connect_timeout = "msecs",
  max_auto_retry_delay = "secs",
}

local function check_24_value(key, kind, value)
  local text = tostring(value)
  if kind == "uint" then
    if not text:match("^%d+$") then
      error("Invalid HTTP client setting: " .. key .. ": Invalid number " .. text)
    end
  elseif kind == "bool" then
    if text ~= "yes" and text ~= "no" then
      error("Invalid HTTP client setting: " .. key .. ": Invalid boolean value " .. text)
    end
  elseif kind == "msecs" or kind == "secs" then
    -- str_parse_get_interval_msecs: a number, then a unit unless it is 0
    local number, unit = text:match("^(%d+) *(%a*)$")
    if number == nil then
      error("Invalid HTTP client setting: " .. key .. ": Invalid time interval: " .. text)
    end
    if unit == "" and tonumber(number) ~= 0 then
      error("Invalid HTTP client setting: " .. key .. ": Time interval '" .. text
            .. "' is missing units (add e.g. 's' for seconds)")
    end
  end
end

local V23_NUMBERS = {  -- CLIENT_SETTING_UINT in 2.3.19's parse_client_settings
  max_idle_time_msecs = true, max_redirects = true, max_attempts = true,
  max_connect_attempts = true, connect_backoff_time_msecs = true,
  connect_backoff_max_time_msecs = true, request_absolute_timeout_msecs = true,
  request_timeout_msecs = true, connect_timeout_msecs = true,
  soft_connect_timeout_msecs = true, max_auto_retry_delay_secs = true,
}

local function client_options(options)
  if type(options) ~= "table" then
    error("bad argument #1 to 'client' (table expected)")
  end
  for key, value in pairs(options) do
    if version == "2.4" and key ~= "event_parent" then
      local kind = V24_KEYS[key]
      if kind == nil then
        error("Invalid HTTP client setting: " .. key .. " is unknown setting")
      end
      check_24_value(key, kind, value)
    elseif version == "2.3" and V23_NUMBERS[key] then
      -- 2.3 reads the keys it knows and ignores the rest
      local n = tonumber(value)
      if n == nil or n < 0 or n ~= math.floor(n) then
        error("Invalid HTTP client setting: " .. key .. ": non-negative number expected")
      end
    end
    out("option", key, tostring(value))
  end
end

local REASONS = {[200] = "OK", [401] = "Unauthorized", [503] = "Service Unavailable"}
local submitted = 0

local function new_request(client, spec)
  if type(spec) ~= "table" or spec.url == nil then
    error("cannot create request: url not specified")
  end
  local request = {method = spec.method or "GET", url = spec.url, headers = {}, payload = ""}
  function request:add_header(name, value)
    table.insert(self.headers, {name, value})
  end
  function request:set_payload(payload)
    self.payload = payload
  end
  function request:submit()
    submitted = submitted + 1
    local scheme, user, password, rest = self.url:match("^(%a+://)([^:@/]*):?([^@/]*)@(.*)$")
    local url = self.url
    out("request")
    out("method", self.method)
    if scheme ~= nil then
      -- http_url_parse(HTTP_URL_ALLOW_USERINFO_PART): lib-http sends the
      -- URL's user and password as Basic credentials
      url = scheme .. rest
      out("userinfo", user .. ":" .. password)
    end
    out("url", url)
    for _, header in ipairs(self.headers) do
      out("header", header[1] .. ": " .. header[2])
    end
    out("body", self.payload)
    local status = responses[submitted] or 200
    return {
      status = function() return status end,
      reason = function() return REASONS[status] or "Whatever" end,
    }
  end
  return request
end

dovecot = {
  i_debug = log("debug"),
  i_info = log("info"),
  i_warning = log("warning"),
  i_error = log("error"),
  http = {
    client = function(options)
      client_options(options)
      return {request = new_request}
    end,
  },
}

-- The mail user --------------------------------------------------------------

local user_methods = {
  var_expand = function(self, text) return text end,
  metadata_get = function() return nil end,
}
if version == "2.3" then
  -- lua_storage_mail_user_plugin_getenv: nil when the setting is missing
  user_methods.plugin_getenv = function(_, name)
    local value = settings[name]
    return value ~= nil and tostring(value) or nil
  end
end

local function mail_user(name)
  return setmetatable({username = name, home = "/home/" .. name, uid = 1000.0,
                       gid = 1000.0, service = "lmtp", session_id = "fake"},
                      {__index = user_methods})
end

-- The driver -----------------------------------------------------------------

local function call(fn_name, ...)
  local fn = rawget(_G, fn_name)
  if type(fn) ~= "function" then
    return false, "missing function " .. fn_name
  end
  local results = table.pack(pcall(fn, ...))
  if not results[1] then
    out("log", "error", fn_name .. ": " .. tostring(results[2]))
    return false
  end
  return true, table.unpack(results, 2, results.n)
end

local function to_fn(event_name)
  return "dovecot_lua_notify_event" .. event_name:gsub("%u", function(c)
    return "_" .. c:lower()
  end)
end

local chunk, load_error = loadfile(script_path)
if chunk == nil then
  out("log", "error", load_error)
  os.exit(1)
end
chunk()

if type(rawget(_G, "script_init")) == "function" then
  if version == "2.4" then
    local table_of_strings = {}
    for key, value in pairs(settings) do
      table_of_strings[key] = tostring(value)
    end
    call("script_init", table_of_strings)
  else
    local ok, code = call("script_init")
    if ok and math.type(code) ~= "integer" then
      out("log", "error", "script_init() returned non-number")
      os.exit(1)
    elseif ok and code ~= 0 then
      out("log", "error", "Script init failed")
      os.exit(1)
    end
  end
end

local NUMBERS = {uid = true, uid_validity = true, date = true, tz = true}

for _, txn in ipairs(scenario.transactions or {}) do
  local ok, ctx = call("dovecot_lua_notify_begin_txn", mail_user(txn.user))
  if ok then
    for _, spec in ipairs(txn.events or {}) do
      local event = {}
      for key, value in pairs(spec) do
        event[key] = NUMBERS[key] and value + 0.0 or value
      end
      local fn = to_fn(event.name)
      if type(rawget(_G, fn)) == "function" then
        call(fn, ctx, event)
      end
    end
    call("dovecot_lua_notify_end_txn", ctx, txn.success ~= false)
  end
end
