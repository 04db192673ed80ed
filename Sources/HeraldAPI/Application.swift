import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Hummingbird
import HummingbirdCore
import HummingbirdWebSocket
import Logging
import NIOCore
import NIOPosix
import OpenAPIHummingbird
import OpenAPIRuntime
import PostgresNIO
import ServiceLifecycle

/// Everything the server needs that is made once at start-up.
public struct AppDependencies: Sendable {
    public var database: Database
    public var postgres: PostgresClient
    public var tokens: AccessTokens
    public var passwords: PasswordHasher
    public var metrics: HTTPMetrics
    public var expectedMigrations: [Int]
    /// Verifies signed links; the delivery workers sign with the same ring.
    public var linkKeys: LinkKeyRing
    /// Services that run beside the HTTP server (the PostgreSQL pools, the delivery workers),
    /// started in order and stopped in reverse after the server.
    public var services: [any Service]
    /// The live streams of this instance (issue 10); nil: the stream routes answer 503.
    public var streams: StreamHub?
    /// The bell's reads kept per user (`FeedCache`); nil: every read goes to the database.
    public var feedCache: FeedCache?
    /// Each organisation's requests in the database at once; nil: a gate from the configuration.
    public var gate: OrganisationGate?
    public var now: @Sendable () -> Date

    public init(
        database: Database, postgres: PostgresClient, tokens: AccessTokens, passwords: PasswordHasher,
        metrics: HTTPMetrics = HTTPMetrics(), expectedMigrations: [Int], linkKeys: LinkKeyRing = .ephemeral(),
        services: [any Service] = [], streams: StreamHub? = nil, feedCache: FeedCache? = nil,
        gate: OrganisationGate? = nil, now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.streams = streams
        self.feedCache = feedCache
        self.gate = gate
        self.linkKeys = linkKeys
        self.services = services
        self.database = database
        self.postgres = postgres
        self.tokens = tokens
        self.passwords = passwords
        self.metrics = metrics
        self.expectedMigrations = expectedMigrations
        self.now = now
    }
}

/// The router: the generated operations behind one request middleware.
public func buildRouter(configuration: AppConfiguration, dependencies: AppDependencies) throws -> Router<HeraldRequestContext> {
    let router = Router(context: HeraldRequestContext.self)
    let authenticator = Authenticator(tokens: dependencies.tokens, now: dependencies.now)
    router.add(
        middleware: RequestMiddleware(
            authenticator: authenticator,
            maxBodyBytes: configuration.maxBodyBytes,
            metrics: dependencies.metrics,
            crossOrigin: configuration.crossOrigin,
            trustedProxies: configuration.trustedProxies))
    let service = HeraldService(
        database: dependencies.database,
        tokens: dependencies.tokens,
        passwords: dependencies.passwords,
        metrics: dependencies.metrics,
        loginLimits: LoginLimits(
            accountLimit: configuration.loginAttemptsPerAccount, addressLimit: configuration.loginAttemptsPerAddress,
            window: configuration.loginWindow),
        refreshTokenTTL: configuration.refreshTokenTTL,
        decoyHash: try dependencies.passwords.decoyHash(),
        expectedMigrations: dependencies.expectedMigrations,
        linkKeys: dependencies.linkKeys,
        destinations: try configuration.destinationGuard(),
        streamTicketLifetime: configuration.streamTicketSeconds, fanout: configuration.fanout,
        databaseURL: try? DatabaseURL(configuration.databaseURL),
        rateLimits: InstanceRateLimits(
            requests: configuration.rateLimitRequests, events: configuration.rateLimitEvents,
            burstSeconds: configuration.rateLimitBurstSeconds),
        now: dependencies.now)
    // Compact JSON with sorted keys: stable bytes for clients and tests, no pretty-printing cost.
    // The live feed's two routes are hand-written (a stream is not a request/response pair).
    StreamRoutes(
        hub: dependencies.streams, database: dependencies.database, authenticator: authenticator, feedCache: dependencies.feedCache,
        now: dependencies.now
    ).register(on: router)
    if configuration.demoPages { DemoPages.register(on: router) }
    try service.registerHandlers(
        on: SkippingTransport(router: router, skipped: StreamRoutes.handWritten),
        configuration: .init(dateTranscoder: FlexibleISO8601(), jsonEncodingOptions: [.sortedKeys, .withoutEscapingSlashes]),
        middlewares: [
            TenantBoundary(
                database: dependencies.database, authenticator: authenticator,
                linkKeys: dependencies.linkKeys, contract: ContractChecks(maxBodyBytes: configuration.maxBodyBytes),
                rateLimits: OrganisationRateLimits(
                    requests: configuration.rateLimitRequests, events: configuration.rateLimitEvents,
                    burstSeconds: configuration.rateLimitBurstSeconds),
                feedCache: dependencies.feedCache,
                gate: dependencies.gate
                    ?? OrganisationGate(
                        limit: configuration.organisationConcurrency, queueLimit: configuration.organisationQueue,
                        now: dependencies.now),
                now: dependencies.now)
        ])
    return router
}

/// The router as the generated code's transport, minus the operations served by hand-written
/// routes (registering a path twice would stop the process). Each GET also answers HEAD, whose
/// body `RequestMiddleware` leaves out.
struct SkippingTransport: ServerTransport {
    let router: Router<HeraldRequestContext>
    let skipped: Set<String>

    func register(
        _ handler: @escaping @Sendable (HTTPRequest, HTTPBody?, ServerRequestMetadata) async throws -> (HTTPResponse, HTTPBody?),
        method: HTTPRequest.Method, path: String
    ) throws {
        guard !skipped.contains(path) else { return }
        router.register(handler, method: method, path: path)
        if method == .get { router.register(handler, method: .head, path: path) }
    }
}

/// The server application: the router plus the PostgreSQL client as a service of the same
/// service group, so SIGTERM stops taking requests, drains, then closes the pool.
public func buildApplication(
    configuration: AppConfiguration, dependencies: AppDependencies, logger: Logger,
    onServerRunning: @escaping @Sendable (Int) async -> Void = { _ in }
) throws -> some ApplicationProtocol {
    let router = try buildRouter(configuration: configuration, dependencies: dependencies)
    // The feed's WebSocket upgrades through a router of its own (StreamRoutes.webSocketRouter).
    let sockets = StreamRoutes(
        hub: dependencies.streams, database: dependencies.database,
        authenticator: Authenticator(tokens: dependencies.tokens, now: dependencies.now), feedCache: dependencies.feedCache,
        now: dependencies.now, metrics: dependencies.metrics)
    return Application(
        responder: StreamSplittingResponder(base: router.buildResponder()),
        server: guardedHTTP1WebSocketUpgrade(
            webSocketRouter: sockets.webSocketRouter(),
            configuration: .init(
                http1: .init(idleTimeout: .seconds(Int64(configuration.httpIdleSeconds))),
                // Frames up to 64 KiB reach the socket's handler, which answers a command over
                // its 16 KiB with an `error` message instead of a bare close (1009).
                ws: .init(maxFrameSize: StreamRoutes.socketFrameLimit))),
        configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "herald"),
        services: [dependencies.postgres] + dependencies.services,
        onServerRunning: { channel in await onServerRunning(channel.localAddress?.port ?? configuration.port) },
        logger: logger)
}

/// `HTTPServerBuilder.http1WebSocketUpgrade(webSocketRouter:configuration:)` with each
/// connection's first request head guarded (`RequestHeadGuard`): a head the decoder refuses is
/// answered and closed, and one that does not arrive within the idle timeout is closed.
func guardedHTTP1WebSocketUpgrade<Sockets: HTTPResponderBuilder & _HB_SendableMetatype>(
    webSocketRouter: Sockets, configuration: HTTP1WebSocketUpgradeChannel.Configuration
) -> HTTPServerBuilder where Sockets.Responder.Context: WebSocketRequestContext {
    let sockets = webSocketRouter.buildResponder()
    let headTimeout = configuration.http1.idleTimeout ?? .seconds(60)
    return HTTPServerBuilder { responder in
        GuardedChildChannel(
            base: HTTP1WebSocketUpgradeChannel(responder: responder, webSocketResponder: sockets, configuration: configuration),
            headTimeout: headTimeout)
    }
}

/// Serves the live feed's requests in a child task of the connection's task. A stream's
/// connection task lives as long as the stream, and a Swift task keeps the deepest stack of
/// async frames it ever needed until it ends (its allocator keeps its slabs): with the request
/// phase (router, middleware, authentication) in a child task, an idle stream keeps only the
/// frames of its body: about 4 KiB less per idle stream (docs/benchmarks.md).
struct StreamSplittingResponder<Base: HTTPResponder>: HTTPResponder where Base.Context == HeraldRequestContext {
    let base: Base

    @Sendable func respond(to request: Request, context: HeraldRequestContext) async throws -> Response {
        guard StreamRoutes.handWritten.contains(request.uri.path) else {
            return try await passing(request, context: context)
        }
        return try await inChildTask { try await passing(request, context: context) }
    }

    /// Not inlined: the router's frames stay out of this one, which a stream's task keeps.
    @inline(never)
    func passing(_ request: Request, context: HeraldRequestContext) async throws -> Response {
        try await base.respond(to: request, context: context)
    }
}

/// What PostgreSQL or the socket said of a failed call, in their words: PostgresNIO's own
/// description of an error hides them.
public enum DatabaseWords {
    /// Whether PostgreSQL answered that it is full rather than refusing this client: too many
    /// connections (SQLSTATE 53300) or out of resources (53xxx).
    public static func isBusy(_ error: any Error) -> Bool {
        (error as? PSQLError)?.serverInfo?[.sqlState]?.hasPrefix("53") == true
    }

    /// Whether a call failed because PostgreSQL cannot be reached just now (down, restarting,
    /// shutting down, out of connections, or no connection lent within the wait), rather than
    /// for what it asked: the API answers such a failure 503 with Retry-After, not a 500. A
    /// statement that outlived its deadline on a connection, and a connection lost during its
    /// COMMIT (`CommitOutcomeUnknown`), stay 500s: the first is a fault to look into, the second
    /// may have committed.
    public static func isUnavailable(_ error: any Error) -> Bool {
        switch error {
        case let error as DatabaseUnavailable:
            return !error.connected
        case let error as PostgresTransactionError:
            return [error.closureError, error.beginError].contains { $0.map(isUnavailable) ?? false }
        case let error as PSQLError:
            if let state = error.serverInfo?[.sqlState] {
                // 53300: too many connections; 57P01-57P03: shutting down, crashed, not accepting connections yet.
                return state == "53300" || ["57P01", "57P02", "57P03"].contains(state)
            }
            return [.connectionError, .serverClosedConnection, .clientClosedConnection, .uncleanShutdown].contains(error.code)
        default:
            return false
        }
    }

    public static func of(_ error: any Error) -> String {
        if let error = error as? PSQLError {
            if let message = error.serverInfo?[.message] {
                return message + (error.serverInfo?[.sqlState].map { " (SQLSTATE \($0))" } ?? "")
            }
            if let underlying = error.underlying {
                return "\(underlying); is it running, and are the URL's host and port right?"
            }
            return "\(error.code)"
        }
        return "\(error)"
    }
}

extension DatabaseURL {
    /// Why a connection with this URL fails now, in PostgreSQL's words (its message for a refused
    /// user, password or database; the socket's error when nothing answers), or nil when one
    /// succeeds. A URL without TLS is checked through the login; one with TLS to the TCP
    /// connection. Not through a pool: a pool that cannot connect only times out.
    public func unreachableReason(timeout: TimeAmount = .seconds(5), logger: Logger) async -> String? {
        await probe(timeout: timeout, logger: logger).map(DatabaseWords.of)
    }

    /// The error of a connection tried with this URL (`unreachableReason`), nil when it succeeds.
    public func probe(timeout: TimeAmount = .seconds(5), logger: Logger) async -> (any Error)? {
        do {
            if var single = plainConnectionConfiguration {
                single.options.connectTimeout = timeout
                let connection = try await PostgresConnection.connect(configuration: single, id: 0, logger: logger)
                try? await connection.close()
            } else {
                let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .connectTimeout(timeout).connect(host: host, port: port).get()
                try? await channel.close()
            }
            return nil
        } catch {
            return error
        }
    }
}

/// A `postgres://user:password@host:port/database[?sslmode=disable|prefer|require]` URL, read
/// once for a pool (`PostgresClient`) or a single connection (a command's first check).
public struct DatabaseURL: Sendable {
    public var host: String
    public var port: Int
    public var username: String
    public var password: String?
    public var database: String?
    /// `disable`, `prefer` or `require` (`verify-ca` and `verify-full` are `require`).
    public var tls: String

    /// `variable` names the setting in errors (`DATABASE_URL`, `DATABASE_OWNER_URL`).
    public init(_ text: String, variable: String = "DATABASE_URL") throws {
        guard let url = URLComponents(string: text), ["postgres", "postgresql"].contains(url.scheme ?? ""),
            let user = url.user
        else { throw ConfigurationError(variable: variable, value: "(not a postgres:// URL)") }
        let database = url.path.hasPrefix("/") ? String(url.path.dropFirst()) : url.path
        let sslmode = url.queryItems?.first(where: { $0.name == "sslmode" })?.value ?? "disable"
        switch sslmode {
        case "require", "verify-ca", "verify-full": tls = "require"
        case "prefer", "allow": tls = "prefer"
        case "disable": tls = "disable"
        default: throw ConfigurationError(variable: variable, value: "sslmode=\(sslmode)")
        }
        host = url.host ?? "127.0.0.1"
        port = url.port ?? 5432
        // URLComponents decodes `user` and `password` already: decoding again turned `p%25ss` into nil.
        username = user
        password = url.password
        self.database = database.isEmpty ? nil : database
    }

    public var clientConfiguration: PostgresClient.Configuration {
        let tls: PostgresClient.Configuration.TLS =
            switch self.tls {
            case "require": .require(.makeClientConfiguration())
            case "prefer": .prefer(.makeClientConfiguration())
            default: .disable
            }
        var configuration = PostgresClient.Configuration(
            host: host, port: port, username: username, password: password, database: database, tls: tls)
        configuration.keepAlive(every: 0)
        return configuration
    }

    /// One connection's configuration, for a URL without TLS (`sslmode=disable`, the default);
    /// nil with TLS.
    public var plainConnectionConfiguration: PostgresConnection.Configuration? {
        guard tls == "disable" else { return nil }
        return PostgresConnection.Configuration(
            host: host, port: port, username: username, password: password, database: database, tls: .disable)
    }
}

extension PostgresClient.Configuration {
    /// Parses `postgres://user:password@host:port/database[?sslmode=disable|prefer|require]`.
    public static func fromURL(_ text: String, variable: String = "DATABASE_URL") throws -> PostgresClient.Configuration {
        try DatabaseURL(text, variable: variable).clientConfiguration
    }

    /// Keep-alive queries on idle connections every `seconds`; 0: none (Herald's default). The
    /// driver arms a keep-alive timer, a task of the pool's, each time a connection goes back to
    /// the pool, and cancels it when the connection is lent again: about 8 % of Herald's CPU for an
    /// uncached feed read (docs/decisions.md, "no keep-alive queries"). A connection that died idle
    /// is found by the statement's deadline instead; set this where something between Herald and
    /// PostgreSQL drops connections idle for less than the pool's minute. At least a second.
    public mutating func keepAlive(every seconds: TimeInterval) {
        guard seconds.isFinite, seconds > 0 else {
            options.keepAliveBehavior = nil
            return
        }
        options.keepAliveBehavior = Options.KeepAliveBehavior(frequency: .milliseconds(Int64(max(seconds, 1) * 1000)))
    }
}

/// Every RFC 3339 date-time, with or without fractional seconds (JavaScript's `toISOString()`
/// sends milliseconds), with any offset (`RFC3339`); Herald writes whole seconds in UTC.
struct FlexibleISO8601: DateTranscoder {
    func encode(_ date: Date) throws -> String {
        date.formatted(.iso8601)
    }

    func decode(_ text: String) throws -> Date {
        if let date = RFC3339.date(from: text) { return date }
        throw DecodingError.dataCorrupted(.init(codingPath: [], debugDescription: "\"\(text)\" is not an RFC 3339 date-time."))
    }
}
