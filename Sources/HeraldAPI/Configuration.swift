import Foundation
import HeraldCore
import HeraldStore
import Logging

/// Everything the server reads from its environment. `docs/configuration.md` lists each variable.
public struct AppConfiguration: Sendable {
    public var host = "127.0.0.1"
    public var port = 8080
    /// The application role's connection URL (never the owner's).
    public var databaseURL = "postgres://herald_app:herald_app@127.0.0.1:5432/herald"
    /// Largest connection pool the server opens.
    public var databasePoolSize = 20
    /// Seconds between keep-alive queries on an idle pooled connection; 0: none.
    public var databaseKeepAlive: TimeInterval = 0
    /// A directory of `<kid>.pem` ES256 private keys; all verify, `jwtActiveKeyID` signs.
    public var jwtKeysDirectory = ".data/jwt"
    /// The key id that signs new tokens; default: the last file name in sort order.
    public var jwtActiveKeyID: String?
    public var jwtIssuer = "herald"
    public var jwtAudience = "herald-api"
    public var accessTokenTTL: TimeInterval = 15 * 60
    public var refreshTokenTTL: TimeInterval = 30 * 24 * 3600
    /// Clock skew allowed on `exp` and `nbf` (RFC 8725 asks for little; 60 s at most here).
    public var jwtLeeway: TimeInterval = 30
    /// argon2id cost: iterations, memory in KiB, lanes.
    public var argon2Iterations: UInt32 = 3
    public var argon2MemoryKiB: UInt32 = 64 * 1024
    public var argon2Parallelism: UInt32 = 1
    /// Failed logins allowed per account and per client address within `loginWindow` seconds.
    public var loginAttemptsPerAccount = 5
    public var loginAttemptsPerAddress = 20
    public var loginWindow: TimeInterval = 15 * 60
    /// Largest request body accepted, in bytes.
    public var maxBodyBytes = 1 << 20
    /// Seconds a connection may stay silent while a request is read, or between requests, before
    /// it is closed (`HERALD_HTTP_IDLE_SECONDS`): a body shorter than its Content-Length held a
    /// connection open forever. A request being answered (a stream included) is not idle.
    public var httpIdleSeconds = 60
    public var logLevel: Logger.Level = .info
    /// `json` (production) or `text`.
    public var logFormat = "json"

    // MARK: Delivery
    /// The worker role's connection URL (`herald_worker`); the delivery workers need it.
    public var workerDatabaseURL: String?
    /// Delivery workers in this process (`herald serve` and `herald worker`): its sends in
    /// flight at once; 0 switches them off.
    public var workers = 64
    public var workerBatchSize = 64
    /// SMTP connections this process opens at most (deliveries and digests together): an email
    /// beyond them waits for one. Separate from `workers`, because relays limit the connections
    /// of one client (Postfix: 50 by default) while webhooks and batch sizes gain from more slots.
    public var smtpConnections = 40
    /// PostgreSQL connections the deliveries' claims, reads, completions and give-backs share;
    /// nil: as many as `workers`, at most 16. Sends hold none: the work of the sends that start
    /// or end together goes in one transaction per organisation.
    public var workerConnections: Int?

    /// The connections this process's deliveries share: `workerConnections`, or its default.
    public var deliveryConnections: Int { workerConnections ?? min(workers, 16) }
    /// Digest runs in flight at once: `digestWorkers`, or its default.
    public var digestConcurrency: Int { digestWorkers ?? max(1, min(workers / 4, 8)) }
    /// `HERALD_DIGEST_WORKERS` (issue 11); nil: a quarter of `workers`, from 1 to 8.
    public var digestWorkers: Int?
    public var workerLeaseSeconds = 60
    public var workerPollMilliseconds = 1000
    /// Confines this process's workers to one organisation (a dedicated worker); nil: all.
    public var workerOrganisation: UUID?
    /// `herald worker` serves `/metrics` and `/healthz` on this port of `host`; 0: no HTTP at all.
    public var workerMetricsPort = 0
    /// Retry schedule: base delay, factor, cap, jitter share.
    public var retryBaseSeconds: Double = 10
    public var retryFactor: Double = 2
    public var retryMaxSeconds: Double = 3600
    public var retryJitter: Double = 0.2
    /// Where links in messages point (tracked links, unsubscribe); default http://host:port.
    public var publicURL: String?
    /// `kid:base64secret,...`: the first signs links, all verify (rotation). When unset, a
    /// key is made at start-up and links die with the process.
    public var linkKeys: String?
    /// `smtp://host:port` (STARTTLS when `?starttls=required`) or `smtps://host:port`.
    public var smtpURL = "smtp://127.0.0.1:2525"
    public var smtpUsername: String?
    public var smtpPassword: String?
    /// The From address when the organisation has not set one.
    public var smtpFrom = "herald@herald.localhost"
    public var smtpTimeout: Double = 30
    /// CIDR ranges that webhook and chat targets may resolve to although private (e.g.
    /// `127.0.0.1/32` for a local receiver). Empty: only public addresses.
    public var destinationsAllowed: [String] = []
    /// The proxies whose `X-Forwarded-For` names the client (`HERALD_TRUSTED_PROXIES`); none by default.
    public var trustedProxies = TrustedProxies([])
    public var webhookTimeout: Double = 10
    /// Seconds one database call may take before it is abandoned (issue 8, item 11).
    public var databaseTimeout: Double = 30
    /// Seconds from SIGTERM/SIGINT to exit, whatever still hangs: in-flight work drains for
    /// most of it, is cancelled, and at the end the process exits anyway.
    public var shutdownSeconds: Double = 25
    /// Webhook/chat sends in flight at once to one endpoint, per process.
    public var endpointConcurrency = 8
    /// Attempts in a row without an answer that open an endpoint's circuit breaker.
    public var circuitFailures = 5
    /// Seconds an open circuit breaker pauses an endpoint before a trial delivery.
    public var circuitCooldownSeconds: Double = 60
    /// Live streams (issue 10, docs/realtime.md): seconds between heartbeats.
    public var streamHeartbeatSeconds: Double = 20
    /// Streams one user may hold at once on this instance; one more is a 429.
    public var streamsPerUser = 5
    /// Streams this instance holds at most; one more is a 503 with Retry-After.
    public var streamsPerInstance = 20_000
    /// Seconds a stream ticket stays usable.
    public var streamTicketSeconds: Double = 60
    /// How long the change log keeps a change: a client that reconnects later resynchronises.
    public var streamRetentionSeconds: Double = 24 * 3600
    /// Changes a stream may be behind before it is told to resynchronise and closed.
    public var streamMaxBacklog = 1000
    /// Seconds between sweeps that push rows whose deliver_at or expiry has come (0: none).
    public var streamSweepSeconds: Double = 1
    /// Seconds between the workers' reads of the outbox's backlog for its gauges (0: none).
    public var backlogSeconds: Double = 15
    /// Seconds the bell's reads (first page, unread count) are kept per user (`FeedCache`),
    /// dropped at once when the bus or this instance says the feed changed; 0: not kept.
    public var feedCacheSeconds: Double = 5
    /// How long an instance trusts its last answer that a token's session is live
    /// (`SessionLiveness`); 0: it asks the database on every request.
    public var sessionCheckSeconds: Double = 30
    /// Serves the demo pages (`/demo/bell`); `make run` turns it on, production leaves it off.
    public var demoPages = false
    /// The web origins whose pages may call `/v1/` from a browser (`HERALD_CORS_ORIGINS`).
    public var crossOrigin = CrossOriginPolicy.none
    /// `herald worker` runs Swift's tasks on SwiftNIO's event loops, so that a task that awaits
    /// a database answer or a socket resumes without a hop between two thread pools
    /// (docs/decisions.md).
    public var tasksOnEventLoops = true
    /// Audiences of at most this many users are written in notify's own transaction (exact
    /// counts in the 202); larger ones are accepted at once and written in chunks (issue 12).
    public var fanoutSyncLimit = 10_000
    /// Users per chunk of a large fan-out, one transaction each.
    public var fanoutChunkSize = 10_000
    /// Large fan-outs this instance expands at once; 0 leaves them to other instances.
    public var fanoutRunners = 2
    /// Requests per second one organisation may make to this instance (0: no limit), and
    /// `POST /v1/events` per second; bursts of `rateLimitBurstSeconds` worth. An organisation's
    /// own limits (`herald organisation rate-limits`) replace them.
    public var rateLimitRequests: Double = 500
    public var rateLimitEvents: Double = 50
    public var rateLimitBurstSeconds: Double = 2
    /// Requests of one organisation this instance runs in the database at once while another
    /// organisation uses it, per lane (its users' feed, its other calls, calls with a key not yet
    /// proven; 0: no bound), and how many more may wait in a lane before a 429
    /// (`OrganisationGate`). By default half the instance's cores (at least 1), per lane
    /// (docs/decisions.md, "half the cores").
    public var organisationConcurrency = max(1, ProcessInfo.processInfo.activeProcessorCount / 2)
    public var organisationQueue = 256
    /// Whether the hottest reads run as named prepared statements (HERALD_PREPARED_STATEMENTS).
    public var preparedStatements = true

    public init() {}

    /// Reads the configuration from environment variables, keeping defaults for those unset.
    public static func fromEnvironment(_ env: [String: String] = ProcessInfo.processInfo.environment) throws -> AppConfiguration {
        var c = AppConfiguration()
        func value(_ name: String) -> String? { env[name].flatMap { $0.isEmpty ? nil : $0 } }
        func number<T: LosslessStringConvertible>(_ name: String, _ target: inout T) throws {
            guard let raw = value(name) else { return }
            guard let parsed = T(raw) else { throw ConfigurationError(variable: name, value: raw) }
            target = parsed
        }
        /// A number that must lie in `range`.
        func number<T: LosslessStringConvertible & Comparable>(_ name: String, _ target: inout T, in range: ClosedRange<T>) throws {
            try number(name, &target)
            guard range.contains(target) else {
                throw ConfigurationError(variable: name, value: "\(target) (\(range.lowerBound) to \(range.upperBound))")
            }
        }
        if let v = value("HERALD_HOST") { c.host = v }
        try number("HERALD_PORT", &c.port, in: 1...65_535)
        if let v = value("DATABASE_URL") { c.databaseURL = v }
        try number("HERALD_DATABASE_POOL_SIZE", &c.databasePoolSize, in: 1...10_000)
        try number("HERALD_DATABASE_KEEPALIVE_SECONDS", &c.databaseKeepAlive, in: 0...86_400)
        if c.databaseKeepAlive > 0 && c.databaseKeepAlive < 1 {
            throw ConfigurationError(variable: "HERALD_DATABASE_KEEPALIVE_SECONDS", value: "\(c.databaseKeepAlive) (0, or 1 to 86400)")
        }
        if let v = value("HERALD_JWT_KEYS_DIR") { c.jwtKeysDirectory = v }
        c.jwtActiveKeyID = value("HERALD_JWT_ACTIVE_KID")
        if let v = value("HERALD_JWT_ISSUER") { c.jwtIssuer = v }
        if let v = value("HERALD_JWT_AUDIENCE") { c.jwtAudience = v }
        try number("HERALD_ACCESS_TOKEN_TTL", &c.accessTokenTTL, in: 10...86_400)
        try number("HERALD_REFRESH_TOKEN_TTL", &c.refreshTokenTTL, in: 60...31_622_400)
        try number("HERALD_JWT_LEEWAY", &c.jwtLeeway)
        guard (0...60).contains(c.jwtLeeway) else {
            throw ConfigurationError(variable: "HERALD_JWT_LEEWAY", value: "\(c.jwtLeeway) (0 to 60)")
        }
        try number("HERALD_ARGON2_ITERATIONS", &c.argon2Iterations, in: 1...1_000)
        try number("HERALD_ARGON2_MEMORY_KIB", &c.argon2MemoryKiB, in: 8...4_194_304)
        try number("HERALD_ARGON2_PARALLELISM", &c.argon2Parallelism, in: 1...64)
        try number("HERALD_LOGIN_ATTEMPTS_PER_ACCOUNT", &c.loginAttemptsPerAccount, in: 1...1_000_000)
        try number("HERALD_LOGIN_ATTEMPTS_PER_ADDRESS", &c.loginAttemptsPerAddress, in: 1...1_000_000)
        try number("HERALD_LOGIN_WINDOW", &c.loginWindow, in: 1...604_800)
        try number("HERALD_MAX_BODY_BYTES", &c.maxBodyBytes, in: 1_024...1_073_741_824)
        try number("HERALD_HTTP_IDLE_SECONDS", &c.httpIdleSeconds, in: 1...86_400)
        if let v = value("HERALD_LOG_LEVEL") {
            guard let level = Logger.Level(rawValue: v) else { throw ConfigurationError(variable: "HERALD_LOG_LEVEL", value: v) }
            c.logLevel = level
        }
        c.workerDatabaseURL = value("DATABASE_WORKER_URL")
        try number("HERALD_WORKERS", &c.workers, in: 0...4_096)
        try number("HERALD_WORKER_BATCH", &c.workerBatchSize)
        try number("HERALD_SMTP_CONNECTIONS", &c.smtpConnections, in: 1...1000)
        if value("HERALD_WORKER_CONNECTIONS") != nil {
            var connections = 0
            try number("HERALD_WORKER_CONNECTIONS", &connections, in: 1...1000)
            c.workerConnections = connections
        }
        if value("HERALD_DIGEST_WORKERS") != nil {
            var digests = 0
            try number("HERALD_DIGEST_WORKERS", &digests)
            guard (1...1000).contains(digests) else {
                throw ConfigurationError(variable: "HERALD_DIGEST_WORKERS", value: "\(digests) (1 to 1000)")
            }
            c.digestWorkers = digests
        }
        try number("HERALD_WORKER_LEASE_SECONDS", &c.workerLeaseSeconds)
        try number("HERALD_WORKER_POLL_MS", &c.workerPollMilliseconds, in: 10...3_600_000)
        if let v = value("HERALD_WORKER_ORGANISATION") {
            guard let id = UUID(uuidString: v) else { throw ConfigurationError(variable: "HERALD_WORKER_ORGANISATION", value: v) }
            c.workerOrganisation = id
        }
        try number("HERALD_WORKER_METRICS_PORT", &c.workerMetricsPort)
        guard (0...65535).contains(c.workerMetricsPort) else {
            throw ConfigurationError(variable: "HERALD_WORKER_METRICS_PORT", value: "\(c.workerMetricsPort) (0 to 65535)")
        }
        try number("HERALD_RETRY_BASE_SECONDS", &c.retryBaseSeconds, in: 0.001...86_400)
        try number("HERALD_RETRY_FACTOR", &c.retryFactor, in: 1...100)
        try number("HERALD_RETRY_MAX_SECONDS", &c.retryMaxSeconds, in: 0.001...2_592_000)
        guard c.retryMaxSeconds >= c.retryBaseSeconds else {
            throw ConfigurationError(
                variable: "HERALD_RETRY_MAX_SECONDS",
                value: "\(c.retryMaxSeconds) (at least HERALD_RETRY_BASE_SECONDS, \(c.retryBaseSeconds))")
        }
        try number("HERALD_RETRY_JITTER", &c.retryJitter)
        guard (0...1).contains(c.retryJitter) else {
            throw ConfigurationError(variable: "HERALD_RETRY_JITTER", value: "\(c.retryJitter) (0 to 1)")
        }
        guard (1...1000).contains(c.workerBatchSize) else {
            throw ConfigurationError(variable: "HERALD_WORKER_BATCH", value: "\(c.workerBatchSize) (1 to 1000)")
        }
        guard (1...3600).contains(c.workerLeaseSeconds) else {
            throw ConfigurationError(variable: "HERALD_WORKER_LEASE_SECONDS", value: "\(c.workerLeaseSeconds) (1 to 3600)")
        }
        // A trailing "/" is dropped here, once, for every use (links, seed-demo's examples).
        c.publicURL = value("HERALD_PUBLIC_URL").map { $0.hasSuffix("/") ? String($0.dropLast()) : $0 }
        if let url = c.publicURL {
            let parts = URLComponents(string: url)
            guard let parts, ["http", "https"].contains(parts.scheme?.lowercased() ?? ""), !(parts.host ?? "").isEmpty,
                parts.query == nil, parts.fragment == nil
            else {
                throw ConfigurationError(
                    variable: "HERALD_PUBLIC_URL", value: "\(url) (an http or https URL of the API, such as https://herald.example.com)")
            }
        }
        c.linkKeys = value("HERALD_LINK_KEYS")
        if let v = value("HERALD_SMTP_URL") { c.smtpURL = v }
        if let problem = SMTPURL.problem(c.smtpURL) {
            throw ConfigurationError(variable: "HERALD_SMTP_URL", value: "\(SMTPURL.redacted(c.smtpURL)) (\(problem))")
        }
        c.smtpUsername = value("HERALD_SMTP_USERNAME")
        c.smtpPassword = value("HERALD_SMTP_PASSWORD")
        if let v = value("HERALD_SMTP_FROM") { c.smtpFrom = v }
        // Refused now rather than as a DEAD reason on every email.
        do { c.smtpFrom = try Validate.emailAddress(c.smtpFrom, field: "HERALD_SMTP_FROM") } catch {
            throw ConfigurationError(variable: "HERALD_SMTP_FROM", value: "\(c.smtpFrom) (\(error.message))")
        }
        try number("HERALD_SMTP_TIMEOUT", &c.smtpTimeout, in: 1...3_600)
        if let v = value("HERALD_TRUSTED_PROXIES") {
            guard let proxies = TrustedProxies(setting: v) else {
                throw ConfigurationError(variable: "HERALD_TRUSTED_PROXIES", value: "\(v) (addresses or CIDR blocks, separated by commas)")
            }
            c.trustedProxies = proxies
        }
        if let v = value("HERALD_DESTINATIONS_ALLOW") {
            c.destinationsAllowed = v.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        }
        try number("HERALD_WEBHOOK_TIMEOUT", &c.webhookTimeout, in: 0.1...3_600)
        try number("HERALD_DATABASE_TIMEOUT", &c.databaseTimeout)
        try number("HERALD_SHUTDOWN_SECONDS", &c.shutdownSeconds)
        try number("HERALD_ENDPOINT_CONCURRENCY", &c.endpointConcurrency)
        try number("HERALD_CIRCUIT_FAILURES", &c.circuitFailures)
        try number("HERALD_CIRCUIT_COOLDOWN_SECONDS", &c.circuitCooldownSeconds)
        guard c.databaseTimeout >= 0.1 else {
            throw ConfigurationError(variable: "HERALD_DATABASE_TIMEOUT", value: "\(c.databaseTimeout) (at least 0.1)")
        }
        guard c.shutdownSeconds >= 1 else {
            throw ConfigurationError(variable: "HERALD_SHUTDOWN_SECONDS", value: "\(c.shutdownSeconds) (at least 1)")
        }
        guard (1...1000).contains(c.endpointConcurrency) else {
            throw ConfigurationError(variable: "HERALD_ENDPOINT_CONCURRENCY", value: "\(c.endpointConcurrency) (1 to 1000)")
        }
        guard c.circuitFailures >= 1 else {
            throw ConfigurationError(variable: "HERALD_CIRCUIT_FAILURES", value: "\(c.circuitFailures) (at least 1)")
        }
        guard c.circuitCooldownSeconds >= 0 else {
            throw ConfigurationError(variable: "HERALD_CIRCUIT_COOLDOWN_SECONDS", value: "\(c.circuitCooldownSeconds) (0 or more)")
        }
        try number("HERALD_RATE_LIMIT_REQUESTS", &c.rateLimitRequests)
        try number("HERALD_RATE_LIMIT_EVENTS", &c.rateLimitEvents)
        try number("HERALD_RATE_LIMIT_BURST_SECONDS", &c.rateLimitBurstSeconds)
        guard c.rateLimitRequests >= 0, c.rateLimitEvents >= 0 else {
            throw ConfigurationError(
                variable: "HERALD_RATE_LIMIT_REQUESTS", value: "\(c.rateLimitRequests)/\(c.rateLimitEvents) (0 or more)")
        }
        guard (1...3600).contains(c.rateLimitBurstSeconds) else {
            throw ConfigurationError(variable: "HERALD_RATE_LIMIT_BURST_SECONDS", value: "\(c.rateLimitBurstSeconds) (1 to 3600)")
        }
        try number("HERALD_ORGANISATION_CONCURRENCY", &c.organisationConcurrency, in: 0...10_000)
        try number("HERALD_ORGANISATION_QUEUE", &c.organisationQueue, in: 0...100_000)
        try number("HERALD_FANOUT_SYNC_LIMIT", &c.fanoutSyncLimit)
        try number("HERALD_FANOUT_CHUNK", &c.fanoutChunkSize)
        try number("HERALD_FANOUT_RUNNERS", &c.fanoutRunners)
        guard (0...64).contains(c.fanoutRunners) else {
            throw ConfigurationError(variable: "HERALD_FANOUT_RUNNERS", value: "\(c.fanoutRunners) (0 to 64)")
        }
        guard (1...1_000_000).contains(c.fanoutSyncLimit) else {
            throw ConfigurationError(variable: "HERALD_FANOUT_SYNC_LIMIT", value: "\(c.fanoutSyncLimit) (1 to 1000000)")
        }
        guard (1...100_000).contains(c.fanoutChunkSize) else {
            throw ConfigurationError(variable: "HERALD_FANOUT_CHUNK", value: "\(c.fanoutChunkSize) (1 to 100000)")
        }
        try number("HERALD_STREAM_HEARTBEAT_SECONDS", &c.streamHeartbeatSeconds)
        try number("HERALD_STREAMS_PER_USER", &c.streamsPerUser)
        try number("HERALD_STREAMS_PER_INSTANCE", &c.streamsPerInstance)
        try number("HERALD_STREAM_TICKET_SECONDS", &c.streamTicketSeconds)
        try number("HERALD_STREAM_RETENTION_SECONDS", &c.streamRetentionSeconds)
        try number("HERALD_STREAM_MAX_BACKLOG", &c.streamMaxBacklog)
        try number("HERALD_STREAM_SWEEP_SECONDS", &c.streamSweepSeconds, in: 0...3_600)
        try number("HERALD_BACKLOG_SECONDS", &c.backlogSeconds, in: 0...3_600)
        try number("HERALD_SESSION_CHECK_SECONDS", &c.sessionCheckSeconds)
        guard (0...900).contains(c.sessionCheckSeconds) else {
            throw ConfigurationError(variable: "HERALD_SESSION_CHECK_SECONDS", value: "\(c.sessionCheckSeconds) (0 to 900)")
        }
        try number("HERALD_FEED_CACHE_SECONDS", &c.feedCacheSeconds)
        guard (0...300).contains(c.feedCacheSeconds) else {
            throw ConfigurationError(variable: "HERALD_FEED_CACHE_SECONDS", value: "\(c.feedCacheSeconds) (0 to 300)")
        }
        guard (1...300).contains(c.streamHeartbeatSeconds) else {
            throw ConfigurationError(variable: "HERALD_STREAM_HEARTBEAT_SECONDS", value: "\(c.streamHeartbeatSeconds) (1 to 300)")
        }
        guard c.streamsPerUser >= 1 else {
            throw ConfigurationError(variable: "HERALD_STREAMS_PER_USER", value: "\(c.streamsPerUser) (at least 1)")
        }
        guard c.streamsPerInstance >= 1 else {
            throw ConfigurationError(variable: "HERALD_STREAMS_PER_INSTANCE", value: "\(c.streamsPerInstance) (at least 1)")
        }
        guard (5...3600).contains(c.streamTicketSeconds) else {
            throw ConfigurationError(variable: "HERALD_STREAM_TICKET_SECONDS", value: "\(c.streamTicketSeconds) (5 to 3600)")
        }
        guard c.streamRetentionSeconds >= 60 else {
            throw ConfigurationError(variable: "HERALD_STREAM_RETENTION_SECONDS", value: "\(c.streamRetentionSeconds) (at least 60)")
        }
        guard (10...100_000).contains(c.streamMaxBacklog) else {
            throw ConfigurationError(variable: "HERALD_STREAM_MAX_BACKLOG", value: "\(c.streamMaxBacklog) (10 to 100000)")
        }
        if let v = value("HERALD_PREPARED_STATEMENTS") {
            guard ["0", "1", "true", "false"].contains(v) else {
                throw ConfigurationError(variable: "HERALD_PREPARED_STATEMENTS", value: "\(v) (0, 1, true or false)")
            }
            c.preparedStatements = v == "1" || v == "true"
        }
        if let v = value("HERALD_TASKS_ON_EVENT_LOOPS") {
            guard ["0", "1", "true", "false"].contains(v) else {
                throw ConfigurationError(variable: "HERALD_TASKS_ON_EVENT_LOOPS", value: "\(v) (0, 1, true or false)")
            }
            c.tasksOnEventLoops = v == "1" || v == "true"
        }
        if let v = value("HERALD_DEMO_PAGES") {
            guard ["0", "1", "true", "false"].contains(v) else { throw ConfigurationError(variable: "HERALD_DEMO_PAGES", value: v) }
            c.demoPages = v == "1" || v == "true"
        }
        if let v = value("HERALD_CORS_ORIGINS") { c.crossOrigin = try CrossOriginPolicy(setting: v) }
        if let v = value("HERALD_LOG_FORMAT") {
            guard ["json", "text"].contains(v) else { throw ConfigurationError(variable: "HERALD_LOG_FORMAT", value: v) }
            c.logFormat = v
        }
        return c
    }
}

extension AppConfiguration {
    /// Where links in messages point.
    public var linkBaseURL: String { publicURL ?? "http://\(host):\(port)" }

    /// Where the links of the emails a command sends lead, and from which setting: a command run
    /// beside a server on another port, without `HERALD_PUBLIC_URL`, would send links that lead
    /// nowhere (a trial), and an email sent is not sent again.
    public var linkBaseNote: String {
        publicURL != nil
            ? "links in the emails lead to \(linkBaseURL) (HERALD_PUBLIC_URL)"
            : "links in the emails lead to \(linkBaseURL): HERALD_PUBLIC_URL is not set, so this host and HERALD_PORT; set it to the API's public URL"
    }

    /// The link key ring from `HERALD_LINK_KEYS`, or a fresh key for this process.
    public func linkKeyRing() throws -> LinkKeyRing {
        guard let linkKeys else { return LinkKeyRing.ephemeral() }
        do { return try LinkKeyRing(configuration: linkKeys) } catch {
            throw ConfigurationError(variable: "HERALD_LINK_KEYS", value: "(\(error))")
        }
    }

    /// The link key ring for a command whose messages other processes must verify (a digest's
    /// unsubscribe link, an inactivity warning's "keep me subscribed"): `HERALD_LINK_KEYS`
    /// itself, never a key of this process alone, whose links no server could verify.
    public func sharedLinkKeyRing(for what: String) throws -> LinkKeyRing {
        guard linkKeys != nil else { throw LinkKeysUnset(what: what) }
        return try linkKeyRing()
    }

    /// The SSRF guard with the configured allowances.
    public func destinationGuard() throws -> DestinationGuard {
        let allowed = try destinationsAllowed.map { cidr in
            guard let network = IPNetwork(cidr) else { throw ConfigurationError(variable: "HERALD_DESTINATIONS_ALLOW", value: cidr) }
            return network
        }
        return DestinationGuard(allowed: allowed)
    }
}

/// An environment variable whose value Herald cannot use.
/// `HERALD_LINK_KEYS` unset where links must outlive the process that signs them.
public struct LinkKeysUnset: Error, CustomStringConvertible {
    public var what: String
    public var description: String {
        "HERALD_LINK_KEYS is not set: the links of \(what) would be signed by a key no server knows (dead unsubscribe links). "
            + "Set it to the servers' HERALD_LINK_KEYS."
    }
}

public struct ConfigurationError: Error, CustomStringConvertible {
    public var variable: String
    public var value: String
    public var description: String { "\(variable)=\(value) is not a valid value" }

    public init(variable: String, value: String) {
        self.variable = variable
        self.value = value
    }
}

extension AppConfiguration {
    /// When notify writes recipients itself and when in chunks.
    public var fanout: FanoutSettings { FanoutSettings(synchronousLimit: fanoutSyncLimit, chunkSize: fanoutChunkSize) }
}
