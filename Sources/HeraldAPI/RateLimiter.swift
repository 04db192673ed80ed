import Foundation
import HTTPTypes
import HeraldStore
import Synchronization

/// A request rate one organisation may use on one instance: `perSecond` on average, with bursts
/// of up to `burst` requests (a token bucket).
public struct RateLimitPolicy: Sendable, Equatable {
    /// The policy's name in the `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers).
    public var name: String
    public var perSecond: Double
    public var burst: Double

    /// The rate as people write it: 50, or 0.5.
    var rateText: String {
        perSecond == perSecond.rounded() && perSecond < 1e15 ? String(Int(perSecond)) : String(perSecond)
    }

    /// The rate with its noun: "1 request", "2.5 requests".
    func rateText(of noun: String) -> String {
        "\(rateText) \(perSecond == 1 ? noun : noun + "s")"
    }

    public init(name: String, perSecond: Double, burst: Double) {
        self.name = name
        self.perSecond = perSecond
        self.burst = max(1, burst)
    }
}

/// What the limiter made of one request.
public struct RateLimitDecision: Sendable, Equatable {
    public var policy: RateLimitPolicy
    public var allowed: Bool
    /// Requests left in the bucket after this one.
    public var remaining: Int
    /// Seconds until a request is allowed again (0 when one is now), rounded up.
    public var retryAfter: Int
    /// Seconds until the bucket is full again, rounded up.
    public var reset: Int

    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-08): the bucket
    /// as a quota (the burst) per window (the seconds the bucket takes to fill), so that what is
    /// left (`r`) never exceeds the quota (`q`), and what is left of it.
    var headers: HTTPFields {
        let window = max(1, Int((policy.burst / policy.perSecond).rounded(.up)))
        return [
            .rateLimitPolicy: "\"\(policy.name)\";q=\(Int(policy.burst.rounded(.down)));w=\(window)",
            .rateLimit: "\"\(policy.name)\";r=\(remaining);t=\(reset)",
        ]
    }
}

extension HTTPField.Name {
    static let rateLimit = HTTPField.Name("RateLimit")!
    static let rateLimitPolicy = HTTPField.Name("RateLimit-Policy")!
}

/// Per-organisation token buckets of this instance (issue 12, fairness): one organisation
/// flooding the API is answered 429 before its requests take a database connection, so other
/// organisations keep their latency. Limits are per instance: behind N instances an
/// organisation gets up to N times them.
public final class RateLimiter: Sendable {
    private struct Key: Hashable {
        var organisation: UUID
        var policy: String
    }

    private struct Bucket {
        var tokens: Double
        var updated: Date
        var policy: RateLimitPolicy

        /// Whether the bucket has refilled by `now` (a new one would be the same).
        func isFull(at now: Date) -> Bool { tokens + now.timeIntervalSince(updated) * policy.perSecond >= policy.burst }
    }

    private let buckets = Mutex<[Key: Bucket]>([:])

    public init() {}

    /// Takes one request of `organisation` under `policy` at `now`.
    public func take(_ organisation: UUID, _ policy: RateLimitPolicy, now: Date) -> RateLimitDecision {
        buckets.withLock { buckets in
            let key = Key(organisation: organisation, policy: policy.name)
            var bucket = buckets[key] ?? Bucket(tokens: policy.burst, updated: now, policy: policy)
            bucket.policy = policy
            let elapsed = max(0, now.timeIntervalSince(bucket.updated))
            bucket.tokens = min(policy.burst, bucket.tokens + elapsed * policy.perSecond)
            bucket.updated = now
            let allowed = bucket.tokens >= 1
            if allowed { bucket.tokens -= 1 }
            buckets[key] = bucket
            // A full bucket says nothing a new one would not: forget idle organisations.
            if buckets.count > 10_000 {
                buckets = buckets.filter { !$0.value.isFull(at: now) }
            }
            let wait = allowed ? 0 : (1 - bucket.tokens) / policy.perSecond
            return RateLimitDecision(
                policy: policy, allowed: allowed, remaining: Int(bucket.tokens.rounded(.down)), retryAfter: Int(wait.rounded(.up)),
                reset: Int(((policy.burst - bucket.tokens) / policy.perSecond).rounded(.up)))
        }
    }
}

/// The instance's default limits (`HERALD_RATE_LIMIT_REQUESTS`, `HERALD_RATE_LIMIT_EVENTS`, 0:
/// none) and bursts (`HERALD_RATE_LIMIT_BURST_SECONDS`).
struct InstanceRateLimits: Sendable {
    var requests: Double
    var events: Double
    var burstSeconds: Double
}

/// The limits of each organisation: the operator's defaults (`HERALD_RATE_LIMIT_REQUESTS`,
/// `HERALD_RATE_LIMIT_EVENTS`), or what `herald organisation rate-limits` set for it, read again
/// every 30 s.
public final class OrganisationRateLimits: Sendable {
    /// Requests per second per organisation and instance; nil: no limit.
    let requests: Double?
    /// `POST /v1/events` per second per organisation and instance; nil: no limit.
    let events: Double?
    /// Bursts: this many seconds' worth of requests at once.
    let burstSeconds: Double
    let limiter = RateLimiter()
    private let cache = Mutex<[UUID: (settings: RateLimitSettings, read: Date)]>([:])
    /// API keys the database accepted lately, by id: a digest of the secret and when.
    private let provenKeys = Mutex<[UUID: (digest: Data, at: Date)]>([:])

    public init(requests: Double?, events: Double?, burstSeconds: Double) {
        self.requests = requests
        self.events = events
        self.burstSeconds = burstSeconds
    }

    /// Takes one request of `operationID` by `organisation`: the first refusal, or the decision
    /// of the narrowest policy that allowed it (for the headers); nil when no limit applies.
    /// `load` reads the organisation's own limits (in the request's transaction) when the copy
    /// kept here is older than 30 s.
    func take(
        _ organisation: UUID, operationID: String, now: Date, load: () async throws -> RateLimitSettings
    ) async throws -> RateLimitDecision? {
        let settings: RateLimitSettings
        if let cached = cachedSettings(organisation, now: now) {
            settings = cached
        } else {
            settings = try await load()
            cache.withLock { $0[organisation] = (settings, now) }
        }
        return take(organisation, operationID: operationID, settings: settings, now: now)
    }

    /// The same without the database, for a credential already proven (a signed access token,
    /// or an API key that passed the database within 30 s) of an organisation whose limits are
    /// known: a flood is refused before it takes a connection. Nil: go through the database.
    func takeEarly(_ credential: Credential, operationID: String, now: Date) -> RateLimitDecision?? {
        guard isProven(credential, now: now), let settings = cachedSettings(credential.organisationID, now: now) else { return nil }
        return .some(take(credential.organisationID, operationID: operationID, settings: settings, now: now))
    }

    /// Remembers an API key the database just accepted (by a digest of its secret).
    func proven(_ credential: Credential, now: Date) {
        guard case .apiKey(let key) = credential else { return }
        provenKeys.withLock { keys in
            if keys.count > 10_000 { keys = keys.filter { now.timeIntervalSince($0.value.at) < 30 } }
            keys[key.id] = (key.secretHash, now)
        }
    }

    /// Whether the credential's organisation is known to be its own: a signed access token, or
    /// an API key the database accepted within 30 s.
    func isProven(_ credential: Credential, now: Date) -> Bool {
        switch credential {
        case .accessToken: return true
        case .apiKey(let key):
            guard let known = provenKeys.withLock({ $0[key.id] }), abs(now.timeIntervalSince(known.at)) < 30 else { return false }
            return known.digest == key.secretHash
        }
    }

    private func cachedSettings(_ organisation: UUID, now: Date) -> RateLimitSettings? {
        guard let cached = cache.withLock({ $0[organisation] }), abs(now.timeIntervalSince(cached.read)) < 30 else { return nil }
        return cached.settings
    }

    /// The operations that send an event (a notify, or a schedule run by hand): each spends the
    /// organisation's `events` rate as well as its requests.
    static let sendsEvents: Set<String> = ["sendEvent", "runSchedule"]

    private func take(_ organisation: UUID, operationID: String, settings: RateLimitSettings, now: Date) -> RateLimitDecision? {
        var policies: [RateLimitPolicy] = []
        if let rate = settings.requestsPerSecond ?? requests, rate > 0 {
            policies.append(RateLimitPolicy(name: "requests", perSecond: rate, burst: rate * burstSeconds))
        }
        if Self.sendsEvents.contains(operationID), let rate = settings.eventsPerSecond ?? events, rate > 0 {
            policies.append(RateLimitPolicy(name: "events", perSecond: rate, burst: rate * burstSeconds))
        }
        var last: RateLimitDecision?
        for policy in policies.reversed() {
            let decision = limiter.take(organisation, policy, now: now)
            if !decision.allowed { return decision }
            last = last ?? decision
        }
        return last
    }
}
