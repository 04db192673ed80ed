import Foundation
import HeraldCore
import Logging
import NIOCore
import PostgresNIO
import Synchronization

/// Errors the store reports in the product's terms. `RequestMiddleware.apiError` maps them to
/// problems, in one place; each case carries what the client needs to hear.
public enum StoreError: Error, Sendable, Equatable {
    /// No such row in the current organisation (another organisation's id looks the same): the
    /// word says what ("user", "group", "notification"). A 404.
    case notFound(String)
    /// A field of the request names a row that does not exist in the current organisation
    /// (a role of `role_ids`): a 422 on that field.
    case unknownReference(field: String, resource: String)
    /// A unique key already holds this value (the constraint name says which).
    case conflict(constraint: String)
    /// A reference to a row that does not exist in the current organisation.
    case invalidReference(constraint: String)
    /// The row is still referenced by others (the constraint or rule says by what), so it
    /// cannot be deleted.
    case stillReferenced(constraint: String)
    /// The row is still needed by others, in the store's words (a schedule whose audience names
    /// the group): a 409 with this sentence.
    case inUse(String)
    /// A CHECK constraint refused the value.
    case checkViolation(constraint: String)
}

/// Herald's PostgreSQL access. Every statement on a tenant table runs inside `withTenant`,
/// which sets the organisation (and the acting user) for that transaction only, so the
/// row-level security policies decide what the statement can see.
public struct Database: Sendable {
    let client: PostgresClient
    let logger: Logger
    /// The most one call may take: waiting for a pooled connection, every statement, COMMIT.
    /// PostgresNIO neither times out nor cancels a query in flight, and after a PostgreSQL
    /// restart one can wait for ever (issue 8, item 11), so every call here has this deadline.
    public let deadline: Duration
    /// Whether `TenantTransaction.query(prepared:)` prepares its statement on the connection
    /// (plans kept per connection), or sends it as an unnamed one like every other statement.
    /// Off behind a transaction-mode pooler that does not track prepared statements (PgBouncer
    /// before 1.21): the next transaction may run on a server connection that never saw it.
    public let preparedStatements: Bool

    /// How long a call waits for a pooled connection (see `withDeadline`): the deadline unless
    /// said (the API's: 10 s; a worker's call may wait its whole deadline for a busy pool).
    let connectionWait: Duration

    public init(
        client: PostgresClient, logger: Logger, deadline: Duration = .seconds(30), connectionWait: Duration? = nil,
        preparedStatements: Bool = true
    ) {
        self.connectionWait = connectionWait ?? deadline
        self.client = client
        self.logger = logger
        self.deadline = deadline
        self.preparedStatements = preparedStatements
    }

    /// Runs `body` in one transaction with the tenant context set. This is the one place the
    /// context is set.
    ///
    /// `SET LOCAL` scopes the settings to the transaction, so a pooled connection (or a
    /// transaction-mode pooler) never carries one organisation's context into another's; unlike
    /// `set_config(…, true)` it also reaches the worker nodes of a distributed PostgreSQL
    /// (Citus). A setting takes no bind parameter: the `SET LOCAL`s run inside `enter_tenant`
    /// (migration 0017), which receives the ids as bound `uuid` parameters and quotes them with
    /// `format(%L)`, so no text from a request reaches them.
    ///
    /// `recipient` confines in-app rows to one user as well (the feed), so a user's feed cannot
    /// show another user's rows even within one organisation.
    ///
    /// `TenantTransaction` is not `Sendable`: it cannot be stored or captured by another task,
    /// so it never outlives `body` (a kept handle could run on a pooled connection that another
    /// tenant's transaction has by then).
    ///
    /// The context is set by one call (`enter_tenant`, migration 0017, which runs the
    /// `SET LOCAL`s); with `admitting`, the same call reads that caller's grant, so a request
    /// is BEGIN, one statement that enters and reads the grant, the handler's statements,
    /// COMMIT. `grant(forUser:)` and `grant(forApiKey:…)` answer from what the entry read.
    public func withTenant<Result: Sendable>(
        _ organisationID: UUID,
        actor: Actor = .system,
        requestID: String? = nil,
        recipient: UUID? = nil,
        admitting admission: Admission? = nil,
        _ body: (TenantTransaction) async throws -> Result
    ) async throws -> Result {
        do {
            let until = ContinuousClock.now + deadline
            return try await withDeadline { held in
                // Held before BEGIN, so the deadline can close it whichever statement hangs.
                try await client.withConnection { connection in
                    held.hold(connection)
                    var tx = TenantTransaction(
                        connection: connection, organisationID: organisationID, actor: actor,
                        requestID: requestID, logger: logger, deadline: until, prepares: preparedStatements)
                    // BEGIN and COMMIT by hand, so each is abandonable like every statement; BEGIN
                    // is sent with the entry, and the caller waits once for both.
                    let result: Result
                    do {
                        let opened = try await tx.run(["BEGIN", tx.entryStatement(recipient: recipient, admitting: admission)])
                        tx.entry = try tx.entry(admitting: admission, from: opened[1])
                        result = try await body(tx)
                    } catch {
                        _ = try? await tx.run("ROLLBACK")
                        throw error
                    }
                    do {
                        try await tx.run("COMMIT")
                    } catch {
                        throw CommitOutcomeUnknown(underlying: "\(error)")
                    }
                    return result
                }
            }
        } catch let error as PostgresTransactionError {
            throw Self.translate(error.closureError ?? error.beginError ?? error.commitError ?? error)
        } catch {
            throw Self.translate(error)
        }
    }

    /// `withTenant`, run again (at most `attempts` runs in all) when PostgreSQL rolled the
    /// transaction back for a deadlock (40P01) or a serialization failure (40001). Nothing of a
    /// rolled-back run was kept, so the next one starts clean; `body` must have no effect outside
    /// the transaction. For work whose loss costs more than a second run: recording a delivery
    /// that was sent (lost, its lease expires and the message goes out again). Each run after
    /// the first waits a few random milliseconds, more each time, so that two transactions that
    /// deadlocked do not meet again in step.
    public func withTenantRetryingConflicts<Result: Sendable>(
        _ organisationID: UUID, attempts: Int = 3, _ body: (TenantTransaction) async throws -> Result
    ) async throws -> Result {
        try await retryingConflicts(attempts: attempts) { try await withTenant(organisationID, body) }
    }

    /// Runs `body` (a transaction, or one statement in its own) again when PostgreSQL rolled it
    /// back for a conflict, as `withTenantRetryingConflicts` says.
    func retryingConflicts<Result: Sendable>(attempts: Int = 3, _ body: () async throws -> Result) async throws -> Result {
        var run = 1
        while true {
            do {
                return try await body()
            } catch let error as PSQLError where run < attempts && Self.isConflict(error) {
                logger.warning(
                    "transaction rolled back by a conflict; running it again",
                    metadata: ["sql_state": .string(error.serverInfo?[.sqlState] ?? "-"), "run": "\(run)"])
                try await Task.sleep(for: .milliseconds(Int.random(in: 5...20) * run))
                run += 1
            }
        }
    }

    /// A deadlock or a serialization failure: the transaction lost to another, and may be run again.
    static func isConflict(_ error: PSQLError) -> Bool {
        ["40P01", "40001"].contains(error.serverInfo?[.sqlState] ?? "")
    }

    /// The organisation with this slug, through the one function that may look across tenants.
    public func organisationID(slug: String) async throws -> UUID? {
        try await query("SELECT organisation_id_for_slug(\(slug))").first?.decode(UUID?.self)
    }

    /// A trivial round trip, for readiness.
    public func ping() async throws {
        try await query("SELECT 1")
    }

    /// Versions recorded in `schema_migrations`.
    public func appliedMigrationVersions() async throws -> [Int] {
        try await query("SELECT version FROM schema_migrations ORDER BY version").map { try $0.decode(Int.self) }
    }

    /// One statement outside a tenant transaction (cross-tenant functions, readiness), under the deadline.
    @discardableResult
    func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        do {
            let until = ContinuousClock.now + deadline
            return try await withDeadline { held in
                try await client.withConnection { connection in
                    held.hold(connection)
                    return try await Self.statement(query, on: connection, logger: logger, until: until)
                }
            }
        } catch {
            throw Self.translate(error)
        }
    }

    /// Runs `body` under `deadline`. When it passes, the task is cancelled (which ends a wait
    /// for a pooled connection) and the connection `body` holds is closed (which fails a query
    /// in flight: PostgresNIO does not cancel one), and the call throws `DatabaseUnavailable`.
    /// The pool replaces a closed connection, so it recovers once the server is back.
    ///
    /// A call that gets no connection within `connectionWait` (the API's 10 s, or the deadline
    /// if shorter) is abandoned then: with PostgreSQL down the pool keeps trying to connect, and
    /// a request waiting the whole deadline outlived a graceful shutdown (its client got no answer).
    func withDeadline<R: Sendable>(_ body: (HeldConnection) async throws -> R) async throws -> R {
        let held = HeldConnection()
        let deadline = self.deadline
        let connectionWait = min(deadline, self.connectionWait)
        return try await withoutActuallyEscaping(body) { body in
            let work = UncheckedSendable(body)
            return try await withThrowingTaskGroup(of: R?.self) { group in
                group.addTask { try await work.value(held) }
                group.addTask {
                    try await EventLoopTimer.sleep(for: connectionWait)
                    // Given up only if still no connection, decided under the lock that lends
                    // one: a connection lent after this is closed at once (`hold`).
                    if held.expireIfWaiting() { throw DatabaseUnavailable(deadline: connectionWait, connected: false) }
                    try await EventLoopTimer.sleep(for: deadline - connectionWait)
                    return nil
                }
                defer { group.cancelAll() }
                do {
                    if let first = try await group.next(), let result = first { return result }
                } catch let error as DatabaseUnavailable where !error.connected {
                    group.cancelAll()
                    logger.warning("database call got no connection in time", metadata: ["wait": "\(connectionWait)"])
                    throw error
                } catch is CancellationError where held.expired {
                    // the body saw its own cancellation after the deadline: report the deadline
                } catch {
                    if held.expired { throw DatabaseUnavailable(deadline: deadline, connected: held.holds, underlying: "\(error)") }
                    throw error
                }
                held.expire()
                group.cancelAll()
                logger.warning("database call abandoned at its deadline", metadata: ["deadline": "\(deadline)"])
                throw DatabaseUnavailable(deadline: deadline, connected: true, underlying: nil)
            }
        }
    }

    /// Runs one statement, abandoned at `until`. A statement in flight when PostgreSQL drops
    /// its connections can wait for ever with no error, even once the connection is closed
    /// (FACTS: PostgreSQL restarts), and a task awaiting it cannot be cancelled; so the caller
    /// waits on a continuation that the statement, the deadline or a cancellation resumes, and
    /// at the deadline the statement is left behind, its connection closed so the pool does not
    /// lend it again.
    static func statement(
        _ query: PostgresQuery, on connection: PostgresConnection, logger: Logger, until: ContinuousClock.Instant
    ) async throws -> [PostgresRow] {
        // PostgresNIO's future interface: the rows are gathered on the connection's event loop and
        // the caller is resumed from there, with no task of its own per statement and no row
        // sequence to iterate (each was a hop between threads on every statement).
        try await statement(on: connection, until: until) { wait in
            connection.query(query, logger: logger).whenComplete { wait.finish($0.map(\.rows)) }
        }
    }

    /// The same for any statement `perform` sends on `connection` (a prepared one), in a task of
    /// its own (PostgresNIO has no future interface for prepared statements).
    static func statement(
        on connection: PostgresConnection, until: ContinuousClock.Instant, _ perform: @escaping @Sendable () async throws -> [PostgresRow]
    ) async throws -> [PostgresRow] {
        try await statement(on: connection, until: until) { wait in
            Task {
                let result: Swift.Result<[PostgresRow], any Error>
                do { result = .success(try await perform()) } catch { result = .failure(error) }
                wait.finish(result)
            }
        }
    }

    /// Statements sent together: PostgresNIO queues them on the connection and sends each as
    /// soon as the one before is answered, from the connection's event loop, so the caller waits
    /// and is resumed once for all of them instead of once each (the hops between threads around
    /// each statement were most of a small request's cost: issue 12). Each is still its own
    /// round trip to PostgreSQL. Returns each statement's rows, in order; the first that failed
    /// is the error. For statements inside a transaction, which those after a failed one then
    /// fail too (aborted): outside one, each would commit on its own.
    static func statements(
        _ queries: [PostgresQuery], on connection: PostgresConnection, logger: Logger, until: ContinuousClock.Instant
    ) async throws -> [[PostgresRow]] {
        guard !queries.isEmpty else { return [] }
        return try await statement(on: connection, until: until) { wait in
            let sent = queries.map { connection.query($0, logger: logger) }
            EventLoopFuture.whenAllComplete(sent, on: connection.eventLoop).whenSuccess { results in
                var rows: [[PostgresRow]] = []
                rows.reserveCapacity(results.count)
                for result in results {
                    switch result {
                    case .success(let answer): rows.append(answer.rows)
                    case .failure(let error):
                        wait.finish(.failure(error))
                        return
                    }
                }
                wait.finish(.success(rows))
            }
        }
    }

    /// Starts a statement with `send`, which calls `finish` on the wait it is given when the
    /// statement ends, and resumes the caller at the first of that, the deadline and a cancellation.
    private static func statement<Value: Sendable>(
        on connection: PostgresConnection, until: ContinuousClock.Instant, send: (StatementWait<Value>) -> Void
    ) async throws -> Value {
        let wait = StatementWait<Value>()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                wait.start(continuation)
                send(wait)
                // A deadline in the shared watch, not a sleeping task or a timer of its own: it is
                // dropped the moment the statement finishes, and wakes nothing (`DeadlineWatch`).
                wait.arm(
                    DeadlineWatch.shared.watch(until: NIODeadline(until)) {
                        wait.finish(
                            .failure(DatabaseUnavailable(deadline: .zero, underlying: "a statement was abandoned at the call's deadline")),
                            closing: connection)
                    })
            }
        } onCancel: {
            // The caller gave up (its deadline passed): stop waiting now.
            wait.finish(.failure(CancellationError()), closing: connection)
        }
    }

    /// A named prepared statement, under the same deadline.
    static func statement<Statement: PostgresPreparedStatement>(
        prepared statement: Statement, on connection: PostgresConnection, logger: Logger, until: ContinuousClock.Instant
    ) async throws -> [PostgresRow] where Statement.Row == PostgresRow {
        try await Self.statement(on: connection, until: until) {
            var rows: [PostgresRow] = []
            for try await row in try await connection.execute(statement, logger: logger) { rows.append(row) }
            return rows
        }
    }

    /// One of the hottest reads as ONE statement outside a tenant transaction (its own implicit
    /// transaction), its plan kept per connection as `TenantTransaction.query(prepared:)` keeps it.
    /// Only for functions that enter the tenant themselves (migration 0031): as the application
    /// role with no tenant context, row-level security shows no row.
    func query<Statement: PostgresPreparedStatement>(prepared statement: Statement) async throws -> [PostgresRow]
    where Statement.Row == PostgresRow {
        guard preparedStatements else {
            return try await query(PostgresQuery(unsafeSQL: Statement.sql, binds: try statement.makeBindings()))
        }
        do {
            let until = ContinuousClock.now + deadline
            return try await withDeadline { held in
                try await client.withConnection { connection in
                    held.hold(connection)
                    return try await Self.statement(prepared: statement, on: connection, logger: logger, until: until)
                }
            }
        } catch {
            throw Self.translate(error)
        }
    }

    /// Maps PostgreSQL's SQLSTATE codes to `StoreError`; anything else passes through.
    static func translate(_ error: any Error) -> any Error {
        guard let psql = error as? PSQLError, let state = psql.serverInfo?[.sqlState] else { return error }
        let constraint = psql.serverInfo?[.constraintName] ?? ""
        switch state {
        case "23505": return StoreError.conflict(constraint: constraint)
        case "23503":
            // The same foreign key refuses an insert naming a missing row and a delete of a row
            // still referenced; PostgreSQL's message says which side this was.
            let deleting = psql.serverInfo?[.message]?.hasPrefix("update or delete on table") ?? false
            return deleting ? StoreError.stillReferenced(constraint: constraint) : StoreError.invalidReference(constraint: constraint)
        case "23514": return StoreError.checkViolation(constraint: constraint)
        default: return error
        }
    }
}

/// A database call that did not finish within `Database.deadline` and was abandoned.
public struct DatabaseUnavailable: Error, CustomStringConvertible, Sendable {
    public var deadline: Duration
    /// False when the call never got a connection (PostgreSQL unreachable, or the pool exhausted
    /// for the whole wait); true when a statement on a connection outlived the deadline.
    public var connected: Bool = true
    var underlying: String?
    public var description: String {
        connected
            ? "The database did not answer in time\(deadline == .zero ? "" : " (\(deadline))")\(underlying.map { ": \($0)" } ?? "")."
            : "No database connection within \(deadline)\(underlying.map { ": \($0)" } ?? "")."
    }
}

/// The connection failed while its COMMIT was in flight: the transaction may or may not have
/// committed, so the caller must not be told to simply retry.
public struct CommitOutcomeUnknown: Error, CustomStringConvertible, Sendable {
    public var underlying: String
    public var description: String { "The connection failed during COMMIT; the outcome is unknown: \(underlying)" }
}

/// The connection a call under a deadline holds, so the deadline can close it.
final class HeldConnection: Sendable {
    private let state = Mutex<(connection: PostgresConnection?, expired: Bool)>((nil, false))

    var expired: Bool { state.withLock { $0.expired } }
    /// Whether the pool lent the call its connection yet.
    var holds: Bool { state.withLock { $0.connection != nil } }

    /// Expires the call if it holds no connection yet; true when it did so.
    func expireIfWaiting() -> Bool {
        state.withLock { state in
            guard state.connection == nil else { return false }
            state.expired = true
            return true
        }
    }

    /// Records the connection; closes it at once when the deadline already passed.
    func hold(_ connection: PostgresConnection) {
        let late = state.withLock { state in
            state.connection = connection
            return state.expired
        }
        if late { connection.close().whenComplete { _ in } }
    }

    /// The deadline passed: close the held connection, which fails whatever waits on it.
    func expire() {
        let connection = state.withLock { state in
            state.expired = true
            return state.connection
        }
        connection?.close().whenComplete { _ in }
    }
}

/// Who resumes a statement's caller first: the statement, its deadline or a cancellation.
final class StatementWait<Value: Sendable>: Sendable {
    private let state = Mutex<(continuation: CheckedContinuation<Value, any Error>?, deadline: DeadlineWatch.Ticket?, done: Bool)>(
        (nil, nil, false))

    func start(_ continuation: CheckedContinuation<Value, any Error>) {
        let cancelled = state.withLock { state in
            if !state.done { state.continuation = continuation }
            return state.done
        }
        if cancelled { continuation.resume(throwing: CancellationError()) }
    }

    func arm(_ deadline: DeadlineWatch.Ticket) {
        let cancel = state.withLock { state in
            state.deadline = deadline
            return state.done
        }
        if cancel { DeadlineWatch.shared.cancel(deadline) }
    }

    /// Resumes the caller unless something did already; true when this call did. With
    /// `closing`, the connection is closed first and the caller resumed once it is: resumed
    /// earlier, the caller would hand the connection back to the pool, which could lend it to
    /// another request just before the close kills that request's statement.
    @discardableResult
    func finish(_ result: Swift.Result<Value, any Error>, closing connection: PostgresConnection? = nil) -> Bool {
        let (continuation, deadline) = state.withLock { state in
            let taken = (state.continuation, state.deadline)
            state.continuation = nil
            state.done = true
            return taken
        }
        if let deadline { DeadlineWatch.shared.cancel(deadline) }
        guard let continuation else { return false }
        if let connection {
            connection.close().whenComplete { _ in continuation.resume(with: result) }
        } else {
            continuation.resume(with: result)
        }
        return true
    }
}

/// One read as a statement and what its rows mean, so that several can go out together
/// (`TenantTransaction.read`); or an answer known without asking (no statement).
struct StoreRead<Value> {
    let statement: PostgresQuery?
    let decode: ([PostgresRow]) throws -> Value

    init(statement: PostgresQuery, decode: @escaping ([PostgresRow]) throws -> Value) {
        self.statement = statement
        self.decode = decode
    }

    private init(ready value: Value) {
        statement = nil
        decode = { _ in value }
    }

    /// A read that sends nothing and answers `value`.
    static func ready(_ value: Value) -> Self { Self(ready: value) }
}

/// Lets a non-escaping, non-Sendable closure run in a child task of a group that the caller
/// awaits before returning (so it never outlives the closure's scope).
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

/// One transaction with the tenant context set. Only the store can reach its connection.
/// Deliberately not `Sendable` (see `Database.withTenant`).
public struct TenantTransaction {
    let connection: PostgresConnection
    /// The organisation every statement in this transaction is confined to.
    public let organisationID: UUID
    /// Who is acting, for the audit log.
    public let actor: Actor
    /// The request that caused this transaction, for the audit log.
    public let requestID: String?
    let logger: Logger
    /// When the enclosing call's deadline passes.
    let deadline: ContinuousClock.Instant
    /// Whether `query(prepared:)` prepares (`Database.preparedStatements`).
    let prepares: Bool
    /// The caller's grant as the entry read it (`withTenant(admitting:)`).
    var entry: Entry = .none

    /// One statement without translation, abandoned at the deadline.
    @discardableResult
    func run(_ query: PostgresQuery) async throws -> [PostgresRow] {
        try await Database.statement(query, on: connection, logger: logger, until: deadline)
    }

    /// Statements sent together, without translation (`Database.statements`): each one's rows.
    func run(_ queries: [PostgresQuery]) async throws -> [[PostgresRow]] {
        try await Database.statements(queries, on: connection, logger: logger, until: deadline)
    }

    /// Reads that do not depend on each other's answers, sent together (`Database.statements`):
    /// the caller waits once for all of them, and each answer is decoded by its own read.
    func read<each Value>(_ reads: repeat StoreRead<each Value>) async throws -> (repeat each Value) {
        var statements: [PostgresQuery] = []
        for read in repeat each reads {
            if let statement = read.statement { statements.append(statement) }
        }
        let answers = try await query(statements)
        var position = 0
        func decode<V>(_ read: StoreRead<V>) throws -> V {
            guard read.statement != nil else { return try read.decode([]) }
            defer { position += 1 }
            return try read.decode(answers[position])
        }
        return (repeat try decode(each reads))
    }

    /// `statements`, then `read`, sent together: what `read` found once the statements ran.
    func query<Value>(_ statements: [PostgresQuery], then read: StoreRead<Value>) async throws -> Value {
        guard let last = read.statement else {
            try await query(statements)
            return try read.decode([])
        }
        let answers = try await query(statements + [last])
        return try read.decode(answers[answers.count - 1])
    }

    /// Statements that do not depend on each other's answers, sent together and answered in
    /// order (`Database.statements`). Constraint violations surface as `StoreError`, as from `query`.
    @discardableResult
    func query(_ queries: [PostgresQuery]) async throws -> [[PostgresRow]] {
        do {
            return try await run(queries)
        } catch {
            throw Database.translate(error)
        }
    }

    /// One of the hottest reads, its plan kept per connection: a named prepared statement, or,
    /// with `Database.preparedStatements` off, the same SQL and binds as an unnamed one.
    func query<Statement: PostgresPreparedStatement>(prepared statement: Statement) async throws -> [PostgresRow]
    where Statement.Row == PostgresRow {
        guard prepares else { return try await query(PostgresQuery(unsafeSQL: Statement.sql, binds: try statement.makeBindings())) }
        do {
            return try await Database.statement(prepared: statement, on: connection, logger: logger, until: deadline)
        } catch {
            throw Database.translate(error)
        }
    }

    /// Runs one statement. Constraint violations surface here as `StoreError`, so a caller
    /// can react to them inside the transaction (which PostgreSQL then aborts).
    @discardableResult
    func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        do {
            return try await run(query)
        } catch {
            throw Database.translate(error)
        }
    }

    /// Lends this transaction to code that cannot take it as an argument (the generated
    /// handlers, which only see a task-local), for as long as `body` runs. The loan is
    /// `Sendable` so it can sit in a task-local, but it gives out the transaction only inside
    /// `TransactionLoan.run`, and not at all once `body` has returned.
    public func lend<Result>(_ body: (TransactionLoan) async throws -> Result) async throws -> Result {
        let loan = TransactionLoan(self)
        defer { loan.close() }
        return try await body(loan)
    }
}

/// A tenant transaction lent by `TenantTransaction.lend` for the length of one closure.
public final class TransactionLoan: Sendable {
    private struct Parts: Sendable {
        let connection: PostgresConnection
        let organisationID: UUID
        let actor: Actor
        let requestID: String?
        let logger: Logger
        let deadline: ContinuousClock.Instant
        let entry: Entry
        let prepares: Bool
    }

    /// The transaction's parts while it is open and not in use; nil once closed.
    private let state: Mutex<(parts: Parts?, busy: Bool)>

    fileprivate init(_ tx: TenantTransaction) {
        state = Mutex(
            (
                Parts(
                    connection: tx.connection, organisationID: tx.organisationID, actor: tx.actor,
                    requestID: tx.requestID, logger: tx.logger, deadline: tx.deadline, entry: tx.entry, prepares: tx.prepares), false
            ))
    }

    fileprivate func close() {
        state.withLock { $0.parts = nil }
    }

    /// The organisation of the lent transaction.
    public var organisationID: UUID? { state.withLock { $0.parts?.organisationID } }

    /// Runs `body` on the lent transaction. Throws `TransactionLoanError` once the lender's
    /// closure has returned (the connection may belong to another request by then) or while
    /// another `run` of the same loan is in progress (one statement at a time per connection).
    public func run<Result>(_ body: (TenantTransaction) async throws -> Result) async throws -> Result {
        let parts = try state.withLock { state throws(TransactionLoanError) -> Parts in
            guard let parts = state.parts else { throw .closed }
            guard !state.busy else { throw .busy }
            state.busy = true
            return parts
        }
        defer { state.withLock { $0.busy = false } }
        var tx = TenantTransaction(
            connection: parts.connection, organisationID: parts.organisationID, actor: parts.actor,
            requestID: parts.requestID, logger: parts.logger, deadline: parts.deadline, prepares: parts.prepares)
        tx.entry = parts.entry
        return try await body(tx)
    }
}

/// A lent transaction used after its lender returned, or by two callers at once: a bug.
public enum TransactionLoanError: Error, Sendable {
    case closed, busy
}
