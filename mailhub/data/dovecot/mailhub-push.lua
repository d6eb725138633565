-- mailhub-push.lua: Dovecot 2.3 and 2.4 push notifications to mailhub.
--
-- Sends every event Dovecot's Lua push driver offers (new, appended, read,
-- trashed and expunged messages, flag changes, mailbox changes) to mailhub,
-- in one JSON POST per transaction:
--
--   {"user": "alice", "events": [{"name": "MessageNew", "mailbox": "INBOX",
--                                 "uid": 12, "uid_validity": 1700000000, ...}]}
--
-- Uses Dovecot's built-in HTTP client (dovecot.http, 2.3.19+): no luasocket.
--
-- Settings:
--   mailhub_push_url       http://127.0.0.1:8080/push/v1/notify (required)
--                          credentials may be given as http://user:pass@host/...
--   mailhub_push_username  Basic auth user (instead of credentials in the URL)
--   mailhub_push_password  Basic auth password
--   mailhub_push_timeout_msecs  request timeout, default 2000
--
-- Dovecot 2.3 reads them from the plugin { } section (may be set per user by
-- userdb) through mail_user:plugin_getenv. Dovecot 2.4 has no plugin_getenv:
-- it hands the push_notification lua { lua_settings { } } block to
-- script_init() when it loads the script for a user (values may use
-- %{userdb:...}).
--
-- Install: `mailhub dovecot-config` prints the configuration for either
-- version with this file's installed path; see also doc/push.rst.

local http_client = nil

-- JSON -------------------------------------------------------------------

local escapes = {
  ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
  ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t',
}

local function valid_utf8(s)
  if utf8 ~= nil and utf8.len ~= nil then
    return utf8.len(s) ~= nil
  end
  return not s:find("[\128-\255]")
end

-- Header values may hold raw 8-bit bytes that are not UTF-8: read them as
-- Latin-1 rather than send a body mailhub must refuse.
local function as_utf8(s)
  if valid_utf8(s) then
    return s
  end
  return (s:gsub("[\128-\255]", function(c)
    local b = c:byte()
    return string.char(0xC0 + (b >> 6), 0x80 + (b & 0x3F))
  end))
end

local function encode_string(s)
  local escaped = as_utf8(s):gsub('[%c"\\]', function(c)
    return escapes[c] or string.format("\\u%04x", c:byte())
  end)
  return '"' .. escaped .. '"'
end

local encode

local function is_array(t)
  local n = 0
  for _ in pairs(t) do
    n = n + 1
  end
  for i = 1, n do
    if t[i] == nil then
      return false
    end
  end
  return true
end

local function encode_table(t)
  local parts = {}
  if is_array(t) then
    -- an empty table is an empty list: flags and keywords are lists
    for i = 1, #t do
      parts[#parts + 1] = encode(t[i])
    end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  for k, v in pairs(t) do
    if type(k) == "string" and type(v) ~= "function" and type(v) ~= "userdata" then
      parts[#parts + 1] = encode_string(k) .. ":" .. encode(v)
    end
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

encode = function(v)
  local kind = type(v)
  if kind == "string" then
    return encode_string(v)
  elseif kind == "number" then
    -- Dovecot hands numbers over as floats (uid 12 arrives as 12.0)
    local int = math.tointeger(v)
    if int ~= nil then
      return string.format("%d", int)
    end
    if v ~= v or v == math.huge or v == -math.huge then
      return "null"
    end
    return string.format("%.17g", v)
  elseif kind == "boolean" then
    return v and "true" or "false"
  elseif kind == "table" then
    return encode_table(v)
  end
  return "null"
end

-- Basic auth ---------------------------------------------------------------

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = (a << 16) | ((b or 0) << 8) | (c or 0)
    for j = 0, 3 do
      if j <= (#s - i + 1) then
        local index = ((n >> (18 - 6 * j)) & 0x3F) + 1
        out[#out + 1] = b64chars:sub(index, index)
      else
        out[#out + 1] = "="
      end
    end
  end
  return table.concat(out)
end

-- The push driver's functions ---------------------------------------------

-- The lua_settings table Dovecot 2.4 passes to script_init; nil on 2.3,
-- whose script_init takes no argument.
local lua_settings = nil

function script_init(settings)
  if type(settings) == "table" then
    lua_settings = settings
  end
  -- 2.3 requires the number 0 ("success"); 2.4 ignores what is returned
  return 0
end

local function setting(user, name)
  if lua_settings ~= nil then
    return lua_settings[name]
  end
  return user:plugin_getenv(name)
end

local function client(timeout)
  if http_client == nil then
    local options
    if lua_settings ~= nil then
      -- 2.4: the http_client_* settings without their prefix, as text;
      -- durations need a unit
      options = {
        request_timeout = string.format("%d msecs", timeout),
        request_max_attempts = "2",
        user_agent = "dovecot-mailhub-push/1",
      }
    else
      options = {
        request_timeout_msecs = timeout,
        max_attempts = 2,
        user_agent = "dovecot-mailhub-push/1",
      }
    end
    http_client = dovecot.http.client(options)
  end
  return http_client
end

local function milliseconds(text, default)
  local n = tonumber(text)
  if n == nil or n <= 0 or n ~= math.floor(n) then
    return default
  end
  return math.floor(n)
end

function dovecot_lua_notify_begin_txn(user)
  local timeout = milliseconds(setting(user, "mailhub_push_timeout_msecs"), 2000)
  return {
    user = user.username,
    url = setting(user, "mailhub_push_url"),
    username = setting(user, "mailhub_push_username"),
    password = setting(user, "mailhub_push_password"),
    timeout = timeout,
    events = {},
  }
end

local function collect(ctx, event)
  table.insert(ctx.events, event)
end

dovecot_lua_notify_event_message_new = collect
dovecot_lua_notify_event_message_append = collect
dovecot_lua_notify_event_message_read = collect
dovecot_lua_notify_event_message_trash = collect
dovecot_lua_notify_event_message_expunge = collect
dovecot_lua_notify_event_flags_set = collect
dovecot_lua_notify_event_flags_clear = collect
dovecot_lua_notify_event_mailbox_create = collect
dovecot_lua_notify_event_mailbox_delete = collect
dovecot_lua_notify_event_mailbox_rename = collect
dovecot_lua_notify_event_mailbox_subscribe = collect
dovecot_lua_notify_event_mailbox_unsubscribe = collect

function dovecot_lua_notify_end_txn(ctx, success)
  if not success or #ctx.events == 0 then
    return
  end
  if ctx.url == nil or ctx.url == "" then
    dovecot.i_error("mailhub-push: mailhub_push_url is not set ("
                    .. (lua_settings ~= nil and "lua_settings" or "plugin")
                    .. " section)")
    return
  end
  local request = client(ctx.timeout):request({url = ctx.url, method = "POST"})
  request:add_header("Content-Type", "application/json; charset=utf-8")
  if ctx.username ~= nil and ctx.username ~= "" then
    request:add_header("Authorization",
                       "Basic " .. base64(ctx.username .. ":" .. (ctx.password or "")))
  end
  request:set_payload(encode({user = ctx.user, events = ctx.events}))
  local response = request:submit()
  local status = response:status()
  if status < 200 or status >= 300 then
    dovecot.i_error(string.format("mailhub-push: %s answered %d %s for %d event(s)",
                                  (ctx.url:gsub("//[^@/]*@", "//")), status,
                                  response:reason() or "", #ctx.events))
  end
end
