//! The Lua scripts a [`RedisStore`](super::RedisStore) runs. Each touches one key
//! (`KEYS[1]`), so in a Redis Cluster it runs on the slot of that key's hash tag; each
//! is safe to send twice.
//!
//! Stored values start with a clear header: the value's id in 16 hex digits and a
//! space (characters 1 to 17); the sealed payload follows.

/// Reads the token and its remaining life in milliseconds (`PTTL`), in one step.
pub(super) const LOAD_TOKEN: &str = r"
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
";

/// Stores the token `ARGV[1]` with a TTL of `ARGV[2]` ms, unless the stored token (in
/// this crate's format) has more life left. Remaining lives are compared on Redis's
/// clock alone, so the replicas' clocks play no part. A stored value in another
/// format is replaced.
pub(super) const SAVE_UNLESS_LATER: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored and string.sub(stored, 17, 17) == ' '
    and redis.call('PTTL', KEYS[1]) > tonumber(ARGV[2]) then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Stores the refresh token `ARGV[1]` unless the stored one (in this crate's format)
/// has an id other than `ARGV[2]` (the version it replaces; empty: none) and
/// `ARGV[3]` (its own).
pub(super) const SAVE_REFRESH: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored and string.sub(stored, 17, 17) == ' ' then
    local id = string.sub(stored, 1, 16)
    if id ~= ARGV[2] and id ~= ARGV[3] then
        return 0
    end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

/// Deletes the token if its header (its id and a space) is `ARGV[1]`.
pub(super) const REMOVE_IF_ID: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored and string.sub(stored, 1, 17) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";

/// Takes the lock for owner `ARGV[1]` for `ARGV[2]` ms, or extends it if that owner
/// holds it. A lock without an expiry was not set by a store (which always sets one;
/// it was set by hand, say): it gets one lease, so that it cannot block every
/// refresh for good.
pub(super) const TAKE_OR_RENEW: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if holder then
    if redis.call('PTTL', KEYS[1]) == -1 then
        redis.call('PEXPIRE', KEYS[1], ARGV[2])
    end
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Deletes the lock if owner `ARGV[1]` holds it.
pub(super) const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";
