import ArgumentParser
import Foundation
import HeraldAPI
import HeraldCore
import HeraldDelivery
import HeraldStore
import Hummingbird
import JWTKit
import Logging
import Metrics
import NIOPosix
import PostgresNIO
import Prometheus
import ServiceLifecycle

@main
struct Herald: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Herald, the multi-tenant notification service.",
        subcommands: [
            Serve.self, Worker.self, Migrate.self, SeedDemo.self, OrganisationCommand.self, JWTKeygen.self, PurgeExpired.self,
            JobsCommand.self, MaintenanceCommand.self, DigestsCommand.self,
        ])

    /// ArgumentParser's own, but `serve` and `worker` logging JSON (`HERALD_LOG_FORMAT`, the
    /// default) end a failure with its reason as a JSON line like every other (`"message": "herald
    /// stopped"`, the reason in `error`), not a plain `Error: …` line a log collector cannot read
    /// (an SRE trial). Usage errors, help and the operator commands stay plain text: a person typed them.
    static func main() async {
        var command: any ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            exit(withError: error)
        }
        do {
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            let code = exitCode(for: error)
            let service = command is Serve || command is Worker
            // Unset or empty: JSON, as the configuration reads it.
            let format = ProcessInfo.processInfo.environment["HERALD_LOG_FORMAT"].flatMap { $0.isEmpty ? nil : $0 } ?? "json"
            guard service, format == "json", code != .success else {
                exit(withError: error)
            }
            let logger = Logger(label: "herald") { JSONLogHandler(label: $0, level: .critical) }
            logger.critical("herald stopped", metadata: ["error": "\(message(for: error))", "exit_code": "\(code.rawValue)"])
            Foundation.exit(code.rawValue)
        }
    }
}

/// `herald serve`: the HTTP API.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve the HTTP API until SIGTERM or SIGINT.")

    func run() async throws {
        let config = try AppConfiguration.fromEnvironment()
        bootstrapLogging(config)
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        MetricsAtZero.register()
        let logger = Logger(label: "herald")
        let postgres = PostgresClient(configuration: try poolConfiguration(config), backgroundLogger: logger)
        let linkKeys = try config.linkKeyRing()
        warnOfProcessLinkKeys(config, logger: logger)
        // The process's one notification bus, on the API's pool: the workers and the live feed
        // streams wake on it.
        let bus = NotificationBus(client: postgres, logger: logger)
        let delivery = try DeliveryServices(config, linkKeys: linkKeys, bus: bus, logger: logger)
        try await delivery.whileRunning {
            try await serve(
                config, registry: registry, logger: logger, postgres: postgres, linkKeys: linkKeys, bus: bus, delivery: delivery)
        }
    }

    /// The rest of `run`, once the delivery services exist (they are shut down however it ends).
    private func serve(
        _ config: AppConfiguration, registry: PrometheusCollectorRegistry, logger: Logger, postgres: PostgresClient,
        linkKeys: LinkKeyRing, bus: NotificationBus, delivery: DeliveryServices
    ) async throws {
        // The runners' calls wait their whole deadline for a connection; the API's give up
        // after 10 s (503: the database is unavailable).
        let database = config.database(postgres, logger: logger)
        let apiDatabase = config.database(postgres, logger: logger, connectionWait: .seconds(10))
        let streams = StreamHub(bus: bus, database: apiDatabase, settings: StreamSettings(config), logger: logger)
        // Recurring schedules: each occurrence is a notify, so they run here, as the API's role.
        var scheduleRunner = WorkRunnerConfiguration(name: WorkerPoolConfiguration.defaultName() + ":schedule")
        scheduleRunner.concurrency = 4
        scheduleRunner.batchSize = 4
        scheduleRunner.leaseSeconds = config.workerLeaseSeconds
        scheduleRunner.pollInterval = .milliseconds(max(1_000, config.workerPollMilliseconds))
        let schedules = WorkRunner(
            configuration: scheduleRunner, queue: ScheduleQueue(database: database),
            handler: ScheduleHandler(database: database, worker: scheduleRunner.name, fanout: config.fanout), bus: bus, logger: logger)
        // Large audiences' recipients (issue 12): each chunk is notify's write, so here too.
        var fanouts: [any Service] = []
        if config.fanoutRunners > 0 {
            var fanoutRunner = WorkRunnerConfiguration(name: WorkerPoolConfiguration.defaultName() + ":fanout")
            fanoutRunner.concurrency = config.fanoutRunners
            fanoutRunner.batchSize = config.fanoutRunners
            fanoutRunner.leaseSeconds = config.workerLeaseSeconds
            fanoutRunner.pollInterval = .milliseconds(max(1_000, config.workerPollMilliseconds))
            fanouts.append(
                WorkRunner(
                    configuration: fanoutRunner, queue: FanoutQueue(database: database, organisation: config.workerOrganisation),
                    handler: FanoutHandler(
                        database: database, worker: fanoutRunner.name, chunkSize: config.fanoutChunkSize,
                        leaseSeconds: fanoutRunner.leaseSeconds),
                    bus: bus,
                    logger: logger))
        }
        let feedCache = config.feedCacheSeconds > 0 ? FeedCache(lifetime: config.feedCacheSeconds, bus: bus) : nil
        let tokens = try await accessTokens(config)
        let dependencies = AppDependencies(
            database: apiDatabase, postgres: postgres,
            tokens: tokens, passwords: passwordHasher(config),
            metrics: HTTPMetrics(registry: registry), expectedMigrations: try migrations().map(\.version),
            linkKeys: linkKeys,
            services: [bus, streams, schedules, SessionWatch(bus: bus, tokens: tokens)] + fanouts + (feedCache.map { [$0] } ?? [])
                + delivery.services
                + [DatabaseRoleCheck(client: postgres, needs: .application, variable: "DATABASE_URL", logger: logger)]
                + delivery.roleCheck(logger: logger),
            streams: streams, feedCache: feedCache)
        // Said once the socket is bound: a port in use fails before it, with its own error.
        let workers = delivery.workers
        let app = try buildApplication(configuration: config, dependencies: dependencies, logger: logger) { port in
            logger.info("herald listening", metadata: ["address": "\(config.host):\(port)", "workers": "\(workers)"])
        }
        // The pool only times out when it cannot connect; say why at once, in PostgreSQL's words.
        if let url = try? DatabaseURL(config.databaseURL) {
            Task {
                if let reason = await url.unreachableReason(
                    logger: Logger(label: "herald.database-check", factory: { _ in SwiftLogNoOpLogHandler() }))
                {
                    logger.error(
                        "the database is not reachable: requests fail and /readyz answers 503 until it is",
                        metadata: [
                            "variable": "DATABASE_URL", "host": "\(url.host):\(url.port)", "user": "\(url.username)", "reason": "\(reason)",
                        ])
                }
            }
        }
        // Listed after the application, so it hears SIGTERM first: streams end (clients
        // reconnect elsewhere) before the HTTP server drains its requests.
        try await runUntilSignalled([app, EndStreamsOnShutdown(hub: streams)], shutdownSeconds: config.shutdownSeconds, logger: logger)
    }
}

/// Ends every live stream when a shutdown begins (see `Serve`).
struct EndStreamsOnShutdown: Service {
    let hub: StreamHub

    func run() async throws {
        // Cancelled (the group ends for another reason) is not a shutdown to announce.
        do { try await gracefulShutdown() } catch { return }
        hub.shutDown()
    }
}

/// `herald migrate`: applies pending migrations as the owner role, then brings every
/// organisation's built-in roles and system jobs up to date with this build.
struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Apply pending migrations (as the owner role, DATABASE_OWNER_URL).")

    func run() async throws {
        let env = ProcessInfo.processInfo.environment
        guard let url = env["DATABASE_OWNER_URL"], !url.isEmpty else {
            throw ValidationError("DATABASE_OWNER_URL is not set: migrations run as the schema owner, not as the application role.")
        }
        let logger = Logger(label: "herald.migrate")
        let all = try migrations()
        print("migrate: \(all.count) migration file(s) in \(Migration.shippedDirectory().path)")
        try await withPostgres(url: url, variable: "DATABASE_OWNER_URL", logger: logger) { client in
            let applied = try await Migrator(client: client, logger: logger).migrate(all) { print("migrate: \($0)") }
            print("migrate: \(applied.count) applied, \(all.count - applied.count) already current")
            let database = Database(client: client, logger: logger)
            let organisations = try await database.allOrganisationIDs()
            for id in organisations {
                try await database.withTenant(id) { tx in
                    try await tx.ensureBuiltinRoles()
                    try await tx.ensureSystemJobs()
                }
            }
            print("migrate: built-in roles and system jobs current in \(organisations.count) organisation(s)")
        }
    }
}

/// `herald seed-demo`: a demo organisation with an owner, a member and an API key, and
/// ready-to-paste curl examples.
struct SeedDemo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "seed-demo", abstract: "Create the demo organisation and print tokens and curl examples.")

    @Option(help: "Base URL printed in the examples (default: HERALD_PUBLIC_URL, else 127.0.0.1 on HERALD_PORT).")
    var baseURL: String?

    func run() async throws {
        let config = try AppConfiguration.fromEnvironment()
        // The server `make run` starts next listens where HERALD_PORT says: examples for 8080
        // talked to nothing, or to another instance, when it was changed (a trial).
        let baseURL =
            baseURL ?? config.publicURL ?? "http://127.0.0.1:\(config.port)"

        let logger = Logger(label: "herald.seed")
        let tokens = try await accessTokens(config)
        let hasher = passwordHasher(config)
        let adminPassword = "demo-admin-password", memberPassword = "demo-member-password"
        try await withPostgres(url: config.databaseURL, logger: logger) { client in
            let database = Database(client: client, logger: logger)
            let organisationID: UUID
            if let existing = try await database.organisationID(slug: "demo") {
                organisationID = existing
                print("seed-demo: organisation 'demo' exists (\(existing.lowercased))")
            } else {
                organisationID = try await database.createOrganisation(
                    slug: "demo", name: "Demo Clinic", defaultLocale: "en", defaultTimezone: "Europe/Paris",
                    requestID: commandRequestID("seed-demo")
                ).id
                print("seed-demo: created organisation 'demo' (\(organisationID.lowercased))")
            }
            let adminHash = try await hasher.hash(adminPassword)
            let memberHash = try await hasher.hash(memberPassword)
            let (adminID, memberID, apiKey) = try await database.withTenant(organisationID, requestID: commandRequestID("seed-demo")) {
                tx in
                let admin = try await ensureUser(tx, email: "admin@demo.example", name: "Demo Admin", role: .owner, passwordHash: adminHash)
                let member = try await ensureUser(
                    tx, email: "member@demo.example", name: "Demo Member", role: .member, passwordHash: memberHash)
                let service = try await tx.builtinRole(.service)
                // The key the last run printed stops working: audited, as a revocation through
                // the API would be (a trial's key stopped with no trace in the log).
                for old in try await tx.apiKeys() where old.name == "seed-demo" && old.revokedAt == nil {
                    _ = try await tx.revokeApiKey(old.id)
                    try await tx.audit(
                        action: "apikey.revoke", targetType: "api_key", targetID: old.id.lowercased,
                        before: .object(["name": .string("seed-demo")]), after: .object(["revoked_by": .string("seed-demo")]))
                    print("seed-demo: revoked the API key the last run printed (\(old.id.lowercased)); use the new one below")
                }
                let token = OpaqueToken(kind: .apiKey, organisationID: organisationID)
                _ = try await tx.createApiKey(
                    id: token.id, name: "seed-demo", roleID: service.id, secretHash: token.secretHash, expiresAt: nil)
                try await tx.audit(
                    action: "apikey.create", targetType: "api_key", targetID: token.id.lowercased, before: nil,
                    after: .object(["name": .string("seed-demo"), "role": .string("service")]))
                let types = try await DemoCatalogue.ensure(tx, clinicians: [admin, member])
                print("seed-demo: catalogue ready (\(types) notification types: medical alerts, club outings, CRM events)")
                return (admin, member, token.text)
            }
            print("seed-demo: users admin@demo.example (owner, clinician) and member@demo.example (member, clinician) are ready")
            let now = Date()
            let adminToken = try await tokens.issueAccessToken(organisationID: organisationID, userID: adminID, now: now)
            let memberToken = try await tokens.issueAccessToken(organisationID: organisationID, userID: memberID, now: now)
            print(
                """

                Herald demo organisation 'demo'
                  admin  admin@demo.example  / \(adminPassword)
                  member member@demo.example / \(memberPassword)

                Tokens (access tokens last \(Int(config.accessTokenTTL / 60)) minutes; log in again for more):
                  export ADMIN_TOKEN=\(adminToken)
                  export MEMBER_TOKEN=\(memberToken)
                  export API_KEY=\(apiKey)

                Try:
                  curl -s \(baseURL)/healthz
                  curl -s -X POST \(baseURL)/v1/auth/token -H 'content-type: application/json' \\
                       -d '{"organisation":"demo","email":"admin@demo.example","password":"\(adminPassword)"}'
                  curl -s \(baseURL)/v1/me -H "authorization: Bearer $ADMIN_TOKEN"
                  curl -s \(baseURL)/v1/users -H "authorization: Bearer $ADMIN_TOKEN"
                  curl -s -X POST \(baseURL)/v1/users -H "authorization: Bearer $API_KEY" -H 'content-type: application/json' \\
                       -d '{"email":"dr.bob@demo.example","display_name":"Dr Bob","timezone":"Europe/Paris"}'
                  curl -s \(baseURL)/v1/audit-log -H "authorization: Bearer $ADMIN_TOKEN"
                  curl -s \(baseURL)/v1/users -H "authorization: Bearer $MEMBER_TOKEN"    # 403: members cannot list users

                The engine: a critical implant reading for every clinician, then the member's bell and feed, then why.
                  curl -s -X POST \(baseURL)/v1/events -H "authorization: Bearer $API_KEY" -H 'content-type: application/json' \\
                       -H 'Idempotency-Key: reading-8813' \\
                       -d '{"type":"ISQ_CRITICAL","audience":{"roles":["clinician"]},"payload":{"isq":25,"threshold":55,"implant":"IMP-19"}}'
                  curl -s \(baseURL)/v1/me/notifications/unread-count -H "authorization: Bearer $MEMBER_TOKEN"
                  curl -s \(baseURL)/v1/me/notifications -H "authorization: Bearer $MEMBER_TOKEN"
                  curl -s '\(baseURL)/v1/notifications/debug?event=ISQ_CRITICAL' -H "authorization: Bearer $ADMIN_TOKEN"
                  curl -s -X PUT \(baseURL)/v1/me/preferences -H "authorization: Bearer $MEMBER_TOKEN" -H 'content-type: application/json' \\
                       -d '{"items":[{"category":"alerts","channel":"email","enabled":true,"frequency":"DAILY"}]}'
                  curl -s '\(baseURL)/v1/me/preferences/resolved?type=ISQ_CRITICAL' -H "authorization: Bearer $MEMBER_TOKEN"

                Live: the member's feed as it changes (leave it open, send the event above again in another terminal).
                  curl -N \(baseURL)/v1/me/notifications/stream -H "authorization: Bearer $MEMBER_TOKEN"
                  The bell page (make run serves it): \(baseURL)/demo/bell  (sign in as member@demo.example / \(memberPassword))

                """)
        }
    }

    private func ensureUser(
        _ tx: TenantTransaction, email: String, name: String, role: BuiltinRole, passwordHash: String
    ) async throws -> UUID {
        let id: UUID
        if let existing = try await tx.credentials(email: email) {
            id = existing.id
            try await tx.setPasswordHash(id, passwordHash)
        } else {
            id = try await tx.createUser(NewUser(email: email, displayName: name, passwordHash: passwordHash)).id
        }
        _ = try await tx.setUserRoles(id, [try await tx.builtinRole(role).id])
        return id
    }
}

/// `herald purge-expired`: deletes in-app notifications past their expiry, organisation by
/// organisation (as the owner role, which can list organisations), printing what it removed.
struct PurgeExpired: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "purge-expired", abstract: "Delete in-app notifications whose expiry has passed.")

    func run() async throws {
        guard let url = ProcessInfo.processInfo.environment["DATABASE_OWNER_URL"], !url.isEmpty else {
            throw ValidationError("DATABASE_OWNER_URL is not set: purging walks every organisation, which only the owner role can list.")
        }
        let logger = Logger(label: "herald.purge")
        try await withPostgres(url: url, variable: "DATABASE_OWNER_URL", logger: logger) { client in
            let database = Database(client: client, logger: logger)
            let organisations = try await database.allOrganisationIDs()
            var total = 0
            for id in organisations {
                let removed = try await database.purgeExpired(organisation: id, now: Date(), batch: 5_000)
                if removed > 0 { print("purge-expired: \(removed) from organisation \(id.lowercased)") }
                total += removed
            }
            print("purge-expired: \(total) notification(s) removed across \(organisations.count) organisation(s)")
        }
    }
}

/// `herald organisation create`: an operator creates a tenant and its first owner.
struct OrganisationCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "organisation", abstract: "Manage organisations (operators only).", subcommands: [Create.self, RateLimits.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create an organisation with its built-in roles and an owner.",
            discussion: """
                The first owner's password is read from HERALD_OWNER_PASSWORD (12 to 1024 characters), \
                so it stays out of the shell history and the process list. DATABASE_URL says where.

                With --catalogue demo the organisation starts with the demo catalogue (categories, \
                notification types with templates, preference defaults and a clinician role) and can \
                send its first event at once. Any other catalogue is applied with PUT /v1/catalogue \
                (docs/api.md): GET /v1/catalogue exports one to keep in a repository.
                """)

        @Option(help: "URL-safe identifier used at login, e.g. acme-clinic.") var slug: String
        @Option(help: "Display name.") var name: String
        @Option(help: "Email of the first owner.") var ownerEmail: String
        @Option(help: "Default locale.") var locale = "en"
        @Option(help: "Default IANA time zone.") var timezone = "UTC"
        @Option(help: "Start with a catalogue: `demo` (the demo catalogue) or `none`.") var catalogue = "none"

        func run() async throws {
            let config = try AppConfiguration.fromEnvironment()
            guard let password = ProcessInfo.processInfo.environment["HERALD_OWNER_PASSWORD"], !password.isEmpty else {
                throw ValidationError("Set HERALD_OWNER_PASSWORD to the first owner's password (kept out of the shell history and ps).")
            }
            guard ["demo", "none"].contains(catalogue) else {
                throw ValidationError(
                    "--catalogue: \"\(catalogue)\" is not `demo` or `none`; apply other catalogues with PUT /v1/catalogue.")
            }
            let checked: (String, String, String, String, String)
            let name: String
            do {
                name = try Validate.text(self.name, field: "name")
                checked = (
                    try Validate.slug(slug), try Validate.emailAddress(ownerEmail, field: "owner-email"), try Validate.password(password),
                    try Validate.locale(locale), try Validate.timezone(timezone)
                )
            } catch {
                throw ValidationError("\(error.field): \(error.message)")
            }
            let logger = Logger(label: "herald.organisation")
            let hash = try await passwordHasher(config).hash(checked.2)
            try await withPostgres(url: config.databaseURL, logger: logger) { client in
                let database = Database(client: client, logger: logger)
                let organisation: Organisation
                do {
                    organisation = try await database.createOrganisation(
                        slug: checked.0, name: name, defaultLocale: checked.3, defaultTimezone: checked.4,
                        requestID: commandRequestID("organisation create")
                    ) { tx in
                        let owner = try await tx.createUser(NewUser(email: checked.1, displayName: checked.1, passwordHash: hash))
                        _ = try await tx.setUserRoles(owner.id, [try await tx.builtinRole(.owner).id])
                        try await tx.audit(
                            action: "user.create", targetType: "user", targetID: owner.id.lowercased,
                            before: nil, after: .object(["email": .string(owner.email), "roles": .array([.string("owner")])]))
                        print("organisation: owner \(owner.email) (\(owner.id.lowercased))")
                        if catalogue == "demo" {
                            let types = try await DemoCatalogue.ensure(tx, clinicians: [])
                            print(
                                "organisation: demo catalogue with \(DemoCatalogue.categories.count) categories and \(types) notification types"
                            )
                        }
                    }
                } catch StoreError.conflict(constraint: "organisations_slug_unique") {
                    throw ValidationError("An organisation with the slug \(checked.0) already exists: choose another --slug.")
                }
                print("organisation: created \(organisation.slug) (\(organisation.id.lowercased))")
            }
        }
    }

    struct RateLimits: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rate-limits",
            abstract: "Show or set an organisation's own request limits per instance (docs/operations.md#rate-limits).",
            discussion: """
                Without options it prints the organisation's limits. A value replaces the instance's default \
                (HERALD_RATE_LIMIT_REQUESTS, HERALD_RATE_LIMIT_EVENTS) for this organisation; 0 means no limit; \
                `default` goes back to the instance's. Instances read the change within 30 s.
                """)

        @Option(help: "The organisation's slug.") var slug: String
        // Unconditional: a value such as -5 is read as the value (and refused in words), not as an option.
        @Option(parsing: .unconditional, help: "Requests per second, any operation (a number, 0 for none, or `default`).")
        var requestsPerSecond: String?
        @Option(parsing: .unconditional, help: "POST /v1/events per second (a number, 0 for none, or `default`).")
        var eventsPerSecond: String?

        func run() async throws {
            let config = try AppConfiguration.fromEnvironment()
            let logger = Logger(label: "herald.organisation")
            @Sendable func parse(_ value: String?, _ option: String, current: Double?) throws -> Double? {
                guard let value else { return current }
                if value == "default" { return nil }
                guard let rate = Double(value), rate >= 0, rate <= 1_000_000 else {
                    throw ValidationError("--\(option) must be a number from 0 to 1000000, or `default`.")
                }
                return rate
            }
            try await withPostgres(url: config.databaseURL, logger: logger) { client in
                let database = Database(client: client, logger: logger)
                guard let id = try await database.organisationID(slug: slug) else {
                    throw ValidationError("No organisation has the slug \(slug).")
                }
                // As the audit log keeps them: null for the instance's default.
                @Sendable func audited(_ limits: RateLimitSettings) -> JSONValue {
                    .object([
                        "requests_per_second": limits.requestsPerSecond.map { .number($0) } ?? .null,
                        "events_per_second": limits.eventsPerSecond.map { .number($0) } ?? .null,
                    ])
                }
                let limits = try await database.withTenant(id, requestID: commandRequestID("organisation rate-limits")) { tx in
                    var limits = try await tx.rateLimitSettings()
                    let before = limits
                    if requestsPerSecond != nil || eventsPerSecond != nil {
                        limits.requestsPerSecond = try parse(requestsPerSecond, "requests-per-second", current: limits.requestsPerSecond)
                        limits.eventsPerSecond = try parse(eventsPerSecond, "events-per-second", current: limits.eventsPerSecond)
                        try await tx.setRateLimits(limits)
                        try await tx.audit(
                            action: "organisation.rate_limits", targetType: "organisation", targetID: id.lowercased,
                            before: audited(before), after: audited(limits))
                    }
                    return limits
                }
                func rate(_ rate: Double) -> String {
                    rate == 0 ? "no limit" : "\(rate == rate.rounded() ? String(Int(rate)) : String(rate)) per second"
                }
                // The default as this command's environment sets it: the servers' own may differ.
                func shown(_ own: Double?, _ variable: String, _ fallback: Double) -> String {
                    own.map(rate) ?? "the instance's default, \(variable) (\(rate(fallback)) where this command runs)"
                }
                print(
                    "rate-limits: \(slug) requests: \(shown(limits.requestsPerSecond, "HERALD_RATE_LIMIT_REQUESTS", config.rateLimitRequests))"
                )
                print("rate-limits: \(slug) events: \(shown(limits.eventsPerSecond, "HERALD_RATE_LIMIT_EVENTS", config.rateLimitEvents))")
            }
        }
    }
}

/// `herald jwt-keygen`: a new ES256 signing key for access tokens.
struct JWTKeygen: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "jwt-keygen", abstract: "Write a new ES256 private key as <dir>/<kid>.pem.")

    @Option(help: "Directory of signing keys.") var dir = ".data/jwt"
    @Option(help: "Key id (letters, digits, '.', '_' and '-'; 1 to 64); default: the current UTC time.") var kid: String?

    func validate() throws {
        // The id names the file: no path of its own (`../x` wrote outside --dir), nothing hidden.
        if let kid,
            !(1...64).contains(kid.count) || kid.hasPrefix(".")
                || !kid.unicodeScalars.allSatisfy({
                    $0.isASCII && (CharacterSet.alphanumerics.contains($0) || "._-".unicodeScalars.contains($0))
                })
        {
            throw ValidationError("--kid \(kid): a key id is 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'.")
        }
    }

    func run() async throws {
        let kid =
            kid
            ?? Date().formatted(.iso8601.year().month().day().time(includingFractionalSeconds: false)).replacingOccurrences(
                of: ":", with: "")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let path = (dir as NSString).appendingPathComponent("\(kid).pem")
        guard !FileManager.default.fileExists(atPath: path) else { throw ValidationError("\(path) exists already") }
        let key = ES256PrivateKey()
        guard
            FileManager.default.createFile(atPath: path, contents: Data(key.pemRepresentation.utf8), attributes: [.posixPermissions: 0o600])
        else { throw KeyNotWritten(path: path) }
        print("jwt-keygen: wrote \(path) (kid \(kid))")
    }
}

/// A command could not connect with its database URL: nothing answers there, the host does not
/// resolve, or PostgreSQL refused the user, the password or the database.
struct DatabaseUnreachable: Error, CustomStringConvertible {
    var variable: String
    var url: DatabaseURL
    var reason: String
    var description: String {
        "Cannot connect to PostgreSQL at \(url.host):\(url.port) as \(url.username)\(url.database.map { ", database \($0)" } ?? "") "
            + "(\(variable)): \(reason)"
    }
}

/// A statement of a command that PostgreSQL refused, in PostgreSQL's words (PostgresNIO's own
/// description of an error hides them).
struct CommandDatabaseError: Error, CustomStringConvertible {
    var message: String
    var description: String { "PostgreSQL refused: \(message)" }
}

/// `herald jwt-keygen` could not write its key file (a directory it may not write to, a full disk).
struct KeyNotWritten: Error, CustomStringConvertible {
    var path: String
    var description: String { "jwt-keygen: could not write \(path)" }
}

// MARK: Shared set-up

/// The migrations this build ships (a package resource), or `$HERALD_SQL_DIR/migrations`.
func migrations() throws -> [Migration] {
    try Migration.shipped()
}

func bootstrapLogging(_ config: AppConfiguration) {
    LoggingSystem.bootstrap { label in
        if config.logFormat == "json" { return JSONLogHandler(label: label, level: config.logLevel) }
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = config.logLevel
        return handler
    }
}

/// Makes SwiftNIO's event loops run Swift's tasks too (`HERALD_TASKS_ON_EVENT_LOOPS`, on by
/// default in `herald worker`), before the process starts any of its own. Without it, every
/// database answer and socket read arrives on an event loop and wakes a task on another thread;
/// the worker spent about a tenth of its CPU switching threads. `herald serve` does not: its
/// uncached feed reads were slower with it (docs/decisions.md). Blocking calls stay off both:
/// libcurl and argon2 run on thread pools of their own.
func runTasksOnEventLoops(_ config: AppConfiguration, logger: Logger) {
    // Linux only: on Darwin, NIO insists on the main thread, which an async command's `run` is not.
    #if os(Linux)
        guard config.tasksOnEventLoops else { return }
        let installed = NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
        logger.debug("tasks on SwiftNIO's event loops", metadata: ["installed": "\(installed)"])
    #endif
}

func poolConfiguration(_ config: AppConfiguration) throws -> PostgresClient.Configuration {
    var pool = try PostgresClient.Configuration.fromURL(config.databaseURL)
    // One more than configured: the notification bus holds one for its LISTEN.
    pool.options.maximumConnections = config.databasePoolSize + 1
    // The minimum stays 0, though the pool then arms an idle timer each time a connection goes
    // back: with one, this PostgresNIO traps on a precondition when a connection is asked for
    // while it refills its minimum during a database outage (FaultTests found it). No keep-alive
    // queries unless configured (docs/decisions.md, "no keep-alive queries").
    pool.keepAlive(every: config.databaseKeepAlive)
    return pool
}

func accessTokens(_ config: AppConfiguration) async throws -> AccessTokens {
    try await AccessTokens(
        keys: try AccessTokenKey.load(directory: config.jwtKeysDirectory), activeKeyID: config.jwtActiveKeyID,
        issuer: config.jwtIssuer, audience: config.jwtAudience, ttl: config.accessTokenTTL, leeway: config.jwtLeeway,
        sessionCheckSeconds: config.sessionCheckSeconds)
}

func passwordHasher(_ config: AppConfiguration) -> PasswordHasher {
    PasswordHasher(iterations: config.argon2Iterations, memoryKiB: config.argon2MemoryKiB, parallelism: config.argon2Parallelism)
}

/// Runs `body` with a connected client, then shuts the client down. A command fails at once,
/// naming the setting, when the database cannot be reached or refuses the URL's user, password
/// or database (the pool would retry until its breaker trips, a minute later), and PostgreSQL's
/// own words are shown for a statement it refused.
func withPostgres<T: Sendable>(
    url: String, variable: String = "DATABASE_URL", logger: Logger, _ body: @Sendable (PostgresClient) async throws -> T
) async throws -> T {
    var background = logger
    background.logLevel = .error // the pool's start-up chatter is not news to a CLI user
    let parsed = try DatabaseURL(url, variable: variable)
    if let reason = await parsed.unreachableReason(logger: background) {
        throw DatabaseUnreachable(variable: variable, url: parsed, reason: reason)
    }
    do {
        return try await withPostgresClient(parsed.clientConfiguration, logger: background, body)
    } catch let error as PSQLError {
        throw CommandDatabaseError(message: DatabaseWords.of(error))
    }
}

private func withPostgresClient<T: Sendable>(
    _ configuration: PostgresClient.Configuration, logger background: Logger, _ body: @Sendable (PostgresClient) async throws -> T
) async throws -> T {
    let client = PostgresClient(configuration: configuration, backgroundLogger: background)
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { await client.run() }
        defer { group.cancelAll() }
        return try await body(client)
    }
}
