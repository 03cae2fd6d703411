-- Moves everything a gone consumer had taken back to the end of the queue that is read
-- next, oldest last in, so the oldest runs first; then forgets the consumer, unless it
-- registered again since the sweep looked (then it is alive and keeps its entry).
-- KEYS[1]: its taken list, KEYS[2]: the registry.
-- ARGV[1]: the queue, ARGV[2]: its token, ARGV[3]: its entry as the sweep read it.
local moved = 0
while redis.call('LMOVE', KEYS[1], ARGV[1], 'LEFT', 'RIGHT') do
    moved = moved + 1
end
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] then
    redis.call('HDEL', KEYS[2], ARGV[2])
end
return moved
