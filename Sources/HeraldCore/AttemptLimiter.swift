import Foundation

/// Counts attempts per key in a sliding window and says when a key must wait.
/// A pure value: the caller owns the clock and the lock.
public struct AttemptLimiter: Sendable {
    public var limit: Int
    public var window: TimeInterval
    private var attempts: [String: [Date]] = [:]

    public init(limit: Int, window: TimeInterval) {
        self.limit = limit
        self.window = window
    }

    /// Seconds to wait before `key` may try again, or nil when it may try now.
    public func retryAfter(_ key: String, now: Date) -> TimeInterval? {
        let recent = (attempts[key] ?? []).filter { now.timeIntervalSince($0) < window }
        guard recent.count >= limit, let oldest = recent.min() else { return nil }
        return max(1, window - now.timeIntervalSince(oldest))
    }

    /// Records a failed attempt for `key`.
    public mutating func record(_ key: String, now: Date) {
        var recent = (attempts[key] ?? []).filter { now.timeIntervalSince($0) < window }
        recent.append(now)
        attempts[key] = recent
        if attempts.count > 100_000 { prune(now: now) }
    }

    /// Forgets `key` (after a successful login).
    public mutating func reset(_ key: String) {
        attempts[key] = nil
    }

    /// Forgets every key that starts with `prefix`.
    public mutating func reset(prefix: String) {
        attempts = attempts.filter { key, _ in !key.hasPrefix(prefix) }
    }

    private mutating func prune(now: Date) {
        attempts = attempts.filter { _, dates in dates.contains { now.timeIntervalSince($0) < window } }
    }
}
