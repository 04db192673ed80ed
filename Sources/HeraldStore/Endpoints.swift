import Foundation
import HeraldCore
import PostgresNIO

/// A webhook or chat endpoint of an organisation.
public struct Endpoint: Sendable, Equatable {
    public var id: UUID
    public var channel: NotificationChannel
    /// `standard` (Standard Webhooks) for webhooks; `slack` or `mattermost` for chat.
    public var format: EndpointFormat
    public var name: String
    public var url: String
    /// Notification type keys this endpoint takes; empty = every type.
    public var eventTypes: [String]
    public var enabled: Bool
    public var disabledReason: String?
    /// `whsec_…`; nil for chat.
    public var secret: String?
    /// The secret before the last rotation, still signing until `previousSecretExpiresAt`.
    public var previousSecret: String?
    public var previousSecretExpiresAt: Date?
    /// Secrets rotated away before that one while still in their overlap, each signing until its
    /// own time (0051): a second rotation does not cut the first one's overlap short.
    public var olderSecrets: [RotatedSecret] = []
    public var createdAt: Date
    public var updatedAt: Date
    /// The circuit breaker: consecutive attempts that got no answer, and when (and why) it opened.
    public var circuit = EndpointCircuit()

    /// The secrets that sign a message sent at `now`: the current one, and each earlier one
    /// still within the overlap its rotation promised.
    public func signingSecrets(at now: Date) -> [String] {
        guard let secret else { return [] }
        return [secret] + overlapping(at: now).map(\.secret)
    }

    /// The secrets rotated away that still sign at `now`, the previous one first, with their ends.
    public func overlapping(at now: Date) -> [RotatedSecret] {
        let previous = previousSecret.flatMap { secret in previousSecretExpiresAt.map { RotatedSecret(secret: secret, until: $0) } }
        return ((previous.map { [$0] } ?? []) + olderSecrets).filter { $0.until > now }
    }

    /// Until when a secret rotated away still signs; nil once none does.
    public func overlapEnds(at now: Date) -> Date? {
        overlapping(at: now).map(\.until).max()
    }
}

/// A webhook secret rotated away, and until when it still signs.
public struct RotatedSecret: Sendable, Equatable {
    public var secret: String
    public var until: Date
}

/// An endpoint's circuit breaker as stored (issue 8, item 13).
public struct EndpointCircuit: Sendable, Equatable {
    /// Attempts in a row that got no answer (timed out, connection refused or reset).
    public var failures = 0
    /// When the breaker opened; nil while closed.
    public var openedAt: Date?
    /// When the cool-down ends and a trial delivery may go.
    public var retryAt: Date?
    /// Why it opened.
    public var reason: String?

    public init(failures: Int = 0, openedAt: Date? = nil, retryAt: Date? = nil, reason: String? = nil) {
        self.failures = failures
        self.openedAt = openedAt
        self.retryAt = retryAt
        self.reason = reason
    }

    /// What the breaker lets through at `now`.
    public enum State: String, Sendable {
        /// Deliveries are sent.
        case closed
        /// Deliveries wait until the cool-down ends.
        case open
        /// The cool-down ended: the next delivery is a trial.
        case halfOpen = "half_open"
    }

    public func state(at now: Date) -> State {
        guard openedAt != nil else { return .closed }
        return now < (retryAt ?? .distantPast) ? .open : .halfOpen
    }
}

/// The fields of an endpoint as created or changed.
public struct EndpointFields: Sendable {
    public var name: String?
    public var url: String?
    public var eventTypes: [String]?
    public var enabled: Bool?

    public init(name: String? = nil, url: String? = nil, eventTypes: [String]? = nil, enabled: Bool? = nil) {
        self.name = name
        self.url = url
        self.eventTypes = eventTypes
        self.enabled = enabled
    }
}

extension TenantTransaction {
    public func createEndpoint(
        channel: NotificationChannel, format: EndpointFormat, name: String, url: String, eventTypes: [String],
        secret: String?
    ) async throws -> Endpoint {
        let id = UUID()
        try await query(
            """
            INSERT INTO endpoints (organisation_id, id, channel, format, name, url, event_types, secret)
            VALUES (\(organisationID), \(id), \(channel), \(format), \(name), \(url), \(eventTypes)::text[], \(secret))
            """)
        return try await endpoint(id)
    }

    public func endpoint(_ id: UUID) async throws -> Endpoint {
        guard
            let row = try await query(
                "SELECT \(unescaped: endpointColumns) FROM endpoints WHERE organisation_id = \(organisationID) AND id = \(id)"
            ).first
        else {
            throw StoreError.notFound("endpoint")
        }
        return try decodeEndpoint(row)
    }

    /// The endpoints of `ids` that exist, by id.
    func endpointsRead(_ ids: [UUID]) -> StoreRead<[UUID: Endpoint]> {
        guard !ids.isEmpty else { return .ready([:]) }
        return StoreRead(
            statement:
                "SELECT \(unescaped: endpointColumns) FROM endpoints WHERE organisation_id = \(organisationID) AND id = ANY(\(ids)::uuid[])",
            decode: { rows in Dictionary(try rows.map(decodeEndpoint).map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first }) })
    }

    /// Endpoints oldest first.
    public func endpoints(limit: Int, after cursor: PageCursor?) async throws -> Page<Endpoint> {
        let rows = try await query(
            """
            SELECT \(unescaped: endpointColumns) FROM endpoints
            WHERE organisation_id = \(organisationID)
              AND (\(cursor?.micros)::bigint IS NULL
                   OR (created_at, id) > ('epoch'::timestamptz + \(cursor?.micros) * interval '1 microsecond', \(cursor?.id)))
            ORDER BY created_at, id
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map(decodeEndpoint), limit: limit) { PageCursor(time: $0.createdAt, id: $0.id) }
    }

    /// Changes the fields given. Enabling an endpoint clears the reason it was disabled.
    public func updateEndpoint(_ id: UUID, _ fields: EndpointFields) async throws -> Endpoint {
        // Enabling it, or giving it a new URL, closes its circuit: what the breaker counted was
        // another receiver's silence (a trial waited out a cool-down for a healthy new URL).
        let rows = try await query(
            """
            UPDATE endpoints SET
                name = coalesce(\(fields.name), name), url = coalesce(\(fields.url), url),
                event_types = coalesce(\(fields.eventTypes)::text[], event_types),
                enabled = coalesce(\(fields.enabled)::boolean, enabled),
                disabled_reason = CASE WHEN \(fields.enabled)::boolean THEN NULL ELSE disabled_reason END,
                circuit_failures = CASE WHEN \(fields.enabled)::boolean OR \(fields.url)::text <> url THEN 0 ELSE circuit_failures END,
                circuit_opened_at = CASE WHEN \(fields.enabled)::boolean OR \(fields.url)::text <> url THEN NULL ELSE circuit_opened_at END,
                circuit_retry_at = CASE WHEN \(fields.enabled)::boolean OR \(fields.url)::text <> url THEN NULL ELSE circuit_retry_at END,
                circuit_reason = CASE WHEN \(fields.enabled)::boolean OR \(fields.url)::text <> url THEN NULL ELSE circuit_reason END,
                updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id
            """)
        guard !rows.isEmpty else { throw StoreError.notFound("endpoint") }
        // The rows still waiting go to the new URL: their `destination` says so (a trial read
        // the old URL on rows the worker then sent to the new one). Rows already sent keep the
        // URL they went to. By deliveries_due_endpoint.
        if let url = fields.url {
            try await query(
                """
                UPDATE deliveries SET destination = \(url), updated_at = now()
                WHERE organisation_id = \(organisationID) AND endpoint_id = \(id) AND status IN ('PENDING', 'FAILED') AND destination <> \(url)
                """)
        }
        return try await endpoint(id)
    }

    /// Deletes an endpoint. Its deliveries keep their history and are left with nowhere to go
    /// (a worker ends them DEAD): the column is cleared here, not by an `ON DELETE SET NULL`
    /// foreign key, which a distributed PostgreSQL refuses on a key that includes organisation_id.
    public func deleteEndpoint(_ id: UUID) async throws {
        try await query("UPDATE deliveries SET endpoint_id = NULL WHERE organisation_id = \(organisationID) AND endpoint_id = \(id)")
        guard try await !query("DELETE FROM endpoints WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING id").isEmpty else {
            throw StoreError.notFound("endpoint")
        }
    }

    /// Replaces a webhook endpoint's secret; the old one keeps signing until `overlapUntil`, and
    /// those rotated away before it until the ends they were promised (at most eight; none when
    /// `overlapUntil` is not after `now`: no overlap ends every one).
    public func rotateEndpointSecret(_ id: UUID, newSecret: String, overlapUntil: Date, now: Date) async throws -> Endpoint {
        let locked = try await query(
            "SELECT \(unescaped: endpointColumns) FROM endpoints WHERE organisation_id = \(organisationID) AND id = \(id) FOR UPDATE")
        guard let before = try locked.first.map(decodeEndpoint) else { throw StoreError.notFound("endpoint") }
        let older = overlapUntil > now ? Array(before.overlapping(at: now).sorted { $0.until > $1.until }.prefix(8)) : []
        let rows = try await query(
            """
            UPDATE endpoints SET previous_secret = secret, previous_secret_expires_at = \(overlapUntil), secret = \(newSecret),
                older_secrets = \(older.map(\.secret))::text[], older_secrets_until = \(older.map(\.until))::timestamptz[], updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) AND channel = 'webhook' RETURNING \(unescaped: endpointColumns)
            """)
        guard let after = try rows.first.map(decodeEndpoint) else { throw StoreError.notFound("endpoint") }
        return after
    }

    /// Disables an enabled endpoint for `reason` (a receiver's 410 Gone), audited as
    /// `endpoint.disable` by the system, in the same transaction; nothing when it was disabled already.
    public func disableEndpoint(_ id: UUID, reason: String) async throws {
        let disabled = try await query(
            "UPDATE endpoints SET enabled = false, disabled_reason = \(reason), updated_at = now() WHERE organisation_id = \(organisationID) AND id = \(id) AND enabled RETURNING id"
        )
        guard !disabled.isEmpty else { return }
        try await audit(
            action: "endpoint.disable", targetType: "endpoint", targetID: id.lowercased, before: .object(["enabled": .bool(true)]),
            after: .object(["enabled": .bool(false), "disabled_reason": .string(reason)]))
    }

    /// Counts an attempt that got no answer; at `threshold` in a row the breaker opens (again,
    /// after a failed trial) for `cooldown` seconds with `reason`. True when it is open now.
    @discardableResult
    public func recordEndpointNoAnswer(_ id: UUID, threshold: Int, cooldown: TimeInterval, reason: String) async throws -> Bool {
        let rows = try await query(
            """
            UPDATE endpoints SET circuit_failures = circuit_failures + 1,
                circuit_opened_at = CASE WHEN circuit_failures + 1 >= \(threshold)::integer THEN coalesce(circuit_opened_at, now())
                                         ELSE circuit_opened_at END,
                circuit_retry_at = CASE WHEN circuit_failures + 1 >= \(threshold)::integer
                                        THEN now() + make_interval(secs => \(cooldown)::double precision) ELSE circuit_retry_at END,
                circuit_reason = CASE WHEN circuit_failures + 1 >= \(threshold)::integer THEN \(reason) ELSE circuit_reason END
            WHERE organisation_id = \(organisationID) AND id = \(id) RETURNING circuit_failures >= \(threshold)::integer
            """)
        return try rows.first?.decode(Bool.self) ?? false
    }

    /// These endpoints' receivers answered (whatever the status): their breakers close.
    public func recordEndpointAnswers(_ ids: Set<UUID>) async throws {
        guard !ids.isEmpty else { return }
        try await query(
            """
            UPDATE endpoints SET circuit_failures = 0, circuit_opened_at = NULL, circuit_retry_at = NULL, circuit_reason = NULL
            WHERE organisation_id = \(organisationID) AND id = ANY(\(Array(ids))::uuid[]) AND (circuit_failures > 0 OR circuit_opened_at IS NOT NULL)
            """)
    }

    /// Takes the half-open breaker's one trial: moves the end of the cool-down on so other
    /// deliveries keep waiting while the trial runs. False when another worker took it first.
    public func takeCircuitTrial(_ id: UUID, cooldown: TimeInterval) async throws -> Bool {
        try await !query(
            """
            UPDATE endpoints SET circuit_retry_at = now() + make_interval(secs => \(cooldown)::double precision)
            WHERE organisation_id = \(organisationID) AND id = \(id) AND circuit_opened_at IS NOT NULL AND circuit_retry_at <= now()
            RETURNING id
            """
        ).isEmpty
    }

    /// The enabled endpoints that take notifications of `typeKey`, by channel, as a read that can
    /// go out with others.
    func endpointTargetsRead(typeKey: String) -> StoreRead<[NotificationChannel: [EndpointTarget]]> {
        StoreRead(
            statement: """
                SELECT channel, id, url FROM endpoints
                WHERE organisation_id = \(organisationID) AND enabled AND (event_types = '{}' OR \(typeKey) = ANY(event_types))
                ORDER BY created_at, id
                """,
            decode: { rows in
                var targets: [NotificationChannel: [EndpointTarget]] = [:]
                for row in rows {
                    let (channel, id, url) = try row.decode((String, UUID, String).self)
                    guard let channel = NotificationChannel(rawValue: channel) else { continue }
                    targets[channel, default: []].append(EndpointTarget(id: id, url: url))
                }
                return targets
            })
    }
}

private let endpointColumns = """
    id, channel, format, name, url, event_types, enabled, disabled_reason, secret, previous_secret, previous_secret_expires_at,
    created_at, updated_at, circuit_failures, circuit_opened_at, circuit_retry_at, circuit_reason, older_secrets, older_secrets_until
    """

func decodeEndpoint(_ row: PostgresRow) throws -> Endpoint {
    let (
        id, channel, format, name, url, types, enabled, reason, secret, previous, previousUntil, created, updated, failures, openedAt,
        retryAt, circuitReason, older, olderUntil
    ) =
        try row.decode(
            (
                UUID, NotificationChannel, EndpointFormat, String, String, [String], Bool, String?, String?, String?, Date?, Date, Date,
                Int, Date?,
                Date?, String?, [String], [Date]
            ).self, table: "endpoints")
    return Endpoint(
        id: id, channel: channel, format: format, name: name, url: url,
        eventTypes: types, enabled: enabled, disabledReason: reason, secret: secret, previousSecret: previous,
        previousSecretExpiresAt: previousUntil, olderSecrets: zip(older, olderUntil).map(RotatedSecret.init),
        createdAt: created, updatedAt: updated,
        circuit: EndpointCircuit(failures: failures, openedAt: openedAt, retryAt: retryAt, reason: circuitReason))
}
