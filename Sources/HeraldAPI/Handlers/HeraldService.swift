import Foundation
import HeraldCore
import HeraldStore
import Logging
import OpenAPIRuntime
import Synchronization

/// The implementation of every operation in `openapi.yaml`. One file per resource
/// (`HeraldService+Users.swift`, …); this file holds what they share.
struct HeraldService: APIProtocol {
    let database: Database
    let tokens: AccessTokens
    let passwords: PasswordHasher
    let metrics: HTTPMetrics
    let loginLimits: LoginLimits
    let refreshTokenTTL: TimeInterval
    /// Verified when a login names no known account, so every refusal costs the same.
    let decoyHash: String
    /// Versions of the migrations this build ships; readiness compares them with the database.
    let expectedMigrations: [Int]
    /// Verifies signed links (click tracking, unsubscribe).
    let linkKeys: LinkKeyRing
    /// Refuses webhook and chat URLs that resolve to private, loopback or metadata addresses.
    let destinations: DestinationGuard
    /// Seconds a stream ticket stays usable.
    let streamTicketLifetime: TimeInterval
    /// When notify writes recipients itself and when it leaves them to chunks.
    let fanout: FanoutSettings
    /// The API's database, for readiness to say why it cannot be reached (nil: not a URL it can read).
    let databaseURL: DatabaseURL?
    /// The instance's default request limits, which `GET /v1/organisation` shows where the
    /// organisation has none of its own.
    let rateLimits: InstanceRateLimits
    let now: @Sendable () -> Date

    /// Runs `body` in the request's one tenant transaction (opened by `TenantBoundary` in the
    /// caller's organisation, acting as the caller), with the caller's principal.
    func tenant<Result>(_ body: (TenantTransaction, Principal) async throws -> Result) async throws -> Result {
        let scope = try RequestScope.get()
        let principal = try scope.requirePrincipal()
        return try await transaction { tx in try await body(tx, principal) }
    }

    /// Runs `body` in the request's one tenant transaction (a credential's or a signed link's).
    func transaction<Result>(_ body: (TenantTransaction) async throws -> Result) async throws -> Result {
        let scope = try RequestScope.get()
        guard let loan = scope.transaction else {
            scope.logger.critical("an operation without a credential asked for its transaction")
            throw APIError.internalError
        }
        return try await loan.run(body)
    }

    /// A transaction for a credential that arrives in the body (a login, a refresh token),
    /// which the boundary cannot read before the operation decodes it.
    func transaction<Result: Sendable>(
        in organisationID: UUID, actor: Actor = .system, _ body: (TenantTransaction) async throws -> Result
    ) async throws -> Result {
        try await database.withTenant(organisationID, actor: actor, requestID: RequestScope.current?.requestID, body)
    }

    /// A page size and a cursor from the query, validated (422 for either out of range).
    func page(_ limit: Int?, _ cursor: String?) throws -> (Int, PageCursor?) {
        (try PageSize.clamp(limit), try cursor.map { c throws(ValidationError) in try PageCursor(encoded: c) })
    }

    /// A path id; one that is not a UUID is as missing as one that does not exist.
    func id(_ text: String, _ resource: String) throws -> UUID {
        guard let id = Validate.uuid(text) else { throw APIError.notFound(resource: resource) }
        return id
    }

    /// Refuses to hand out permissions the caller does not hold, or to act on someone who holds
    /// more than the caller (no privilege escalation through roles, API keys or user changes).
    func requireHolds(_ permissions: Set<Permission>, _ principal: Principal) throws {
        if let missing = permissions.subtracting(principal.permissions).sorted().first {
            throw APIError.notHeld(missing)
        }
    }
}

/// Failed logins, counted in memory per instance (docs/security.md, docs/decisions.md). An
/// account locks for the address that failed (`accountLimit` from one address, an IPv6 /64
/// counting as one), so that one stranger who knows an organisation's slug and an email cannot
/// lock its user out from everywhere (a trial); failures from ten addresses' worth lock it for
/// all of them, and an address that fails across accounts locks at `addressLimit`.
final class LoginLimits: Sendable {
    private let perAccountAndAddress: Mutex<AttemptLimiter>
    private let perAccount: Mutex<AttemptLimiter>
    private let perAddress: Mutex<AttemptLimiter>
    /// Wrong current passwords of `PUT /v1/me/password`, per user (the account's limit).
    private let passwordChanges: Mutex<AttemptLimiter>

    init(accountLimit: Int, addressLimit: Int, window: TimeInterval) {
        passwordChanges = Mutex(AttemptLimiter(limit: accountLimit, window: window))
        perAccountAndAddress = Mutex(AttemptLimiter(limit: accountLimit, window: window))
        perAccount = Mutex(AttemptLimiter(limit: accountLimit * Self.addressesPerAccount, window: window))
        perAddress = Mutex(AttemptLimiter(limit: addressLimit, window: window))
    }

    /// How many addresses' worth of failures lock an account everywhere.
    static let addressesPerAccount = 10

    /// 429 when the account has failed too often from this address or from everywhere, or the
    /// address too often across accounts.
    func check(account: String, address: String?, now: Date) throws {
        if let wait = perAccountAndAddress.withLock({ $0.retryAfter(Self.pair(account, address), now: now) }) {
            throw APIError.tooManyRequests(
                "Too many failed logins for this account from this address; try again later.", retryAfter: Int(wait.rounded(.up)))
        }
        if let wait = perAccount.withLock({ $0.retryAfter(account, now: now) }) {
            throw APIError.tooManyRequests("Too many failed logins for this account; try again later.", retryAfter: Int(wait.rounded(.up)))
        }
        if let address = Self.source(address), let wait = perAddress.withLock({ $0.retryAfter(address, now: now) }) {
            throw APIError.tooManyRequests("Too many failed logins from this address; try again later.", retryAfter: Int(wait.rounded(.up)))
        }
    }

    /// A login of `account` from `address` is about to be checked: it counts against the account
    /// (from the address, and from everywhere) until a success takes it back, so that attempts
    /// sent together cannot all pass the limit while each is checked.
    func recordAttempt(account: String, address: String?, now: Date) {
        perAccountAndAddress.withLock { $0.record(Self.pair(account, address), now: now) }
        perAccount.withLock { $0.record(account, now: now) }
    }

    /// The login failed: it counts against the address too (across accounts).
    func recordFailure(address: String?, now: Date) {
        if let address = Self.source(address) { perAddress.withLock { $0.record(address, now: now) } }
    }

    /// A login succeeded: the account's counts from this address and from everywhere start again
    /// (not the address's across accounts).
    func recordSuccess(account: String, address: String?) {
        perAccountAndAddress.withLock { $0.reset(Self.pair(account, address)) }
        perAccount.withLock { $0.reset(account) }
    }

    /// An administrator set the account's password: every lock on it is lifted.
    func lift(account: String) {
        perAccountAndAddress.withLock { $0.reset(prefix: Self.pair(account, nil)) }
        perAccount.withLock { $0.reset(account) }
    }

    private static func pair(_ account: String, _ address: String?) -> String { "\(account)|\(source(address) ?? "")" }

    /// Where attempts come from: the address, or for IPv6 its /64 (one host is given a whole
    /// /64, and would otherwise have as many addresses as it likes).
    static func source(_ address: String?) -> String? {
        guard let address, address.contains(":") else { return address }
        var bytes = [UInt8](repeating: 0, count: 16)
        guard inet_pton(AF_INET6, address, &bytes) == 1 else { return address }
        return bytes.prefix(8).map { String(format: "%02x", $0) }.joined() + "::/64"
    }

    /// The account's key for logins: the organisation's slug and the address, as typed, lowercased.
    static func account(organisation: String, email: String) -> String {
        "\(organisation.lowercased())|\(email.lowercased())"
    }

    /// A change of password tries the current one: its failures count per user, apart from
    /// logins (the caller is signed in; a stolen access token must not try passwords at will).
    func checkPasswordChange(of user: UUID, now: Date) throws {
        if let wait = passwordChanges.withLock({ $0.retryAfter(user.uuidString, now: now) }) {
            throw APIError.tooManyRequests(
                "Too many wrong current passwords for this user; try again later.", retryAfter: Int(wait.rounded(.up)))
        }
    }

    func recordPasswordChange(of user: UUID, succeeded: Bool, now: Date) {
        passwordChanges.withLock { if succeeded { $0.reset(user.uuidString) } else { $0.record(user.uuidString, now: now) } }
    }
}

/// A value as the audit log keeps it: its JSON, dates as ISO 8601 strings. A value that does not
/// encode fails the request (a logged 500), never leaving an audit entry without it.
func auditValue(_ value: some Encodable) throws -> JSONValue {
    let encoder = JSONEncoder()
    encoder.dateEncodingStrategy = .iso8601
    return try JSONDecoder().decode(JSONValue.self, from: try encoder.encode(value))
}

/// The update schemas' `minProperties: 1`, which the generated types do not check: an update
/// that names no field (`{}`, or only nulls) is refused before anything is read or audited.
func requireSomeChange<Update>(_ body: Update) throws {
    let named = Mirror(reflecting: body).children.contains { child in
        let value = Mirror(reflecting: child.value)
        return value.displayStyle != .optional || !value.children.isEmpty
    }
    guard named else { throw APIError.badRequest("The body names no field to change: give at least one.") }
}
