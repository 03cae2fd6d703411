-- The scopes announced a new revision in the last ARGV[1] seconds (KEYS[1], by the time Redis
-- gave them in delta.lua), newest first, at most ARGV[2], each with the highest revision
-- announced of it (KEYS[2], "<revision> <task id>"): {scope, entry, scope, entry, ...}. Older entries are
-- dropped on the way: the set holds one window of announcements.
local now = redis.call('TIME')
local since = tonumber(now[1]) + tonumber(now[2]) / 1e6 - tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. since)
local scopes = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', since, 'LIMIT', 0, ARGV[2])
if #scopes == 0 then return {} end
local revisions = redis.call('HMGET', KEYS[2], unpack(scopes))
local found = {}
for i, scope in ipairs(scopes) do
  found[#found + 1] = scope
  found[#found + 1] = revisions[i] or '0 '
end
return found
