import Foundation
import HeraldCore
import PostgresNIO

/// One outbox row.
public struct Delivery: Sendable, Equatable {
    public var id: UUID
    public var eventID: UUID
    public var userID: UUID
    public var channel: NotificationChannel
    public var destination: String
    /// The webhook or chat endpoint; nil for email, or once the endpoint was deleted.
    public var endpointID: UUID?
    public var status: DeliveryStatus
    public var attempts: Int
    public var maxAttempts: Int
    public var nextAttemptAt: Date
    public var leaseOwner: String?
    public var leaseExpiresAt: Date?
    public var lastError: String?
    public var lastResponseCode: Int?
    /// The receiver's reply to the last attempt (the SMTP reply line, or the start of the HTTP body).
    public var lastResponse: String?
    public var sentAt: Date?
    public var createdAt: Date
    public var updatedAt: Date
}

/// One logged attempt of a delivery.
public struct DeliveryAttempt: Sendable, Equatable {
    public var attempt: Int
    public var worker: String
    public var startedAt: Date
    public var finishedAt: Date
    public var outcome: AttemptOutcome
    public var responseCode: Int?
    public var error: String?
}

/// A delivery a worker holds the lease of.
public struct ClaimedDelivery: Sendable, Equatable, Hashable {
    public var organisationID: UUID
    public var deliveryID: UUID
    public var attempt: Int
    /// The webhook or chat endpoint it goes to (nil for email): what the claiming worker counts
    /// against the endpoint's send slots.
    public var endpointID: UUID?

    public init(organisationID: UUID, deliveryID: UUID, attempt: Int, endpointID: UUID? = nil) {
        self.organisationID = organisationID
        self.deliveryID = deliveryID
        self.attempt = attempt
        self.endpointID = endpointID
    }
}

/// How many sends of each endpoint a claim may take (migration 0059): `room` for each busy
/// endpoint, `limit` for any other. A claim without it takes any number.
public struct EndpointRoom: Sendable, Equatable {
    public var limit: Int
    public var busy: [UUID: Int]

    public init(limit: Int, busy: [UUID: Int] = [:]) {
        self.limit = limit
        self.busy = busy
    }

    /// Any number of rows of any endpoint (the SQL functions' defaults).
    public static let unbounded = EndpointRoom(limit: 1000)

    /// The busy endpoints and their room, in a stable order, as the SQL functions take them.
    var busyColumns: (endpoints: [UUID], rooms: [Int]) {
        let sorted = busy.sorted { $0.key.uuidString < $1.key.uuidString }
        return (sorted.map(\.key), sorted.map { max(0, $0.value) })
    }
}

/// How an attempt ended.
public enum AttemptResult: Sendable, Equatable {
    case sent(responseCode: Int?, response: String? = nil)
    /// Try again at `retryAt`.
    case failed(responseCode: Int?, error: String, retryAt: Date)
    /// No more attempts.
    case dead(responseCode: Int?, error: String)
    /// Not sent and never will be: its event was cancelled while a worker held it. It ends
    /// `CANCELLED`, like the rows the cancel reached first (migration 0058).
    case cancelled(error: String)
}

/// The organisation's sender identity for email.
public struct EmailIdentity: Sendable, Equatable {
    public var from: String?
    public var fromName: String?
    public var replyTo: String?

    public init(from: String? = nil, fromName: String? = nil, replyTo: String? = nil) {
        self.from = from
        self.fromName = fromName
        self.replyTo = replyTo
    }
}

/// Everything a worker needs to render and send one delivery, read under the tenant policy.
public struct DeliveryWork: Sendable {
    public var organisationID: UUID
    public var delivery: Delivery
    /// The event's inputs as notify planned from them (render with `NotificationPlanner.render`).
    public var input: PlanInput
    public var recipient: RecipientProfile
    public var eventStatus: EventStatus
    public var eventExpiresAt: Date?
    /// Where the notification leads, if the event named it.
    public var url: String?
    public var email: EmailIdentity
    public var endpoint: Endpoint?
    /// An email whose recipient switched email off for its category since notify: not sent.
    public var emailSwitchedOff = false
    /// The event's category, as its recipient's settings name it.
    public var categoryName = ""
}

/// One ended attempt to record.
public struct RecordedAttempt: Sendable {
    public var claim: ClaimedDelivery
    public var startedAt: Date
    public var result: AttemptResult
    /// The endpoint that answered it, whose breaker its recording clears (0039).
    public var answered: UUID?
    /// Where it was sent, when the row says otherwise (its endpoint's URL changed after the row
    /// was written or last moved): the row's `destination` becomes it (0061).
    public var destination: String?

    public init(claim: ClaimedDelivery, startedAt: Date, result: AttemptResult, answered: UUID? = nil, destination: String? = nil) {
        self.claim = claim
        self.startedAt = startedAt
        self.result = result
        self.answered = answered
        self.destination = destination
    }
}

/// One attempt as `completeDeliveries` sends it (times as seconds since 1970, which
/// `to_timestamp` reads to the microsecond).
private struct CompletedAttempt: Codable, Sendable {
    var position: Int
    var id: UUID
    var attempt: Int
    var status: String
    var code: Int?
    var error: String?
    var retry_at: Double?
    var response: String?
    var started_at: Double
    /// The endpoint that answered this attempt, whose breaker its recording clears (0039).
    var answered: UUID?
    var destination: String?

    init(position: Int, _ recorded: RecordedAttempt) {
        self.position = position
        answered = recorded.answered
        destination = recorded.destination
        id = recorded.claim.deliveryID
        attempt = recorded.claim.attempt
        started_at = recorded.startedAt.timeIntervalSince1970
        switch recorded.result {
        case .sent(let code, let response): (status, self.code, self.response) = ("SENT", code, response)
        case .failed(let code, let error, let retryAt):
            (status, self.code, self.error, retry_at) = ("FAILED", code, error, retryAt.timeIntervalSince1970)
        case .dead(let code, let error): (status, self.code, self.error) = ("DEAD", code, error)
        case .cancelled(let error): (status, self.error) = ("CANCELLED", error)
        }
    }
}

extension CompletedAttempt {
    /// The attempts in order, numbered from 0: the positions the fenced functions return.
    static func numbered(_ attempts: [RecordedAttempt]) -> [Self] {
        attempts.enumerated().map { Self(position: $0, $1) }
    }
}

/// `count` flags in order, true at the `positions` (from 0) a fenced function returned.
private func flags(_ positions: [Int], count: Int) -> [Bool] {
    var flags = [Bool](repeating: false, count: count)
    for position in positions { flags[position] = true }
    return flags
}

/// Which rendering: an event for one recipient.
struct RenderingKey: Hashable {
    var eventID: UUID
    var userID: UUID
}

/// What a worker reads of one (event, recipient) before adding its type (`renderingRowsRead`).
private struct RenderingRow {
    var eventID: UUID
    var typeID: UUID
    var payload: JSONValue
    var actor: JSONValue?
    var subjectType: String?
    var subjectID: String?
    var severity: Severity
    var priority: Priority
    var deliverAt: Date
    var expiresAt: Date?
    var status: EventStatus
    var url: String?
    var recipient: RecipientProfile
    var organisationName: String
    var organisationSlug: String
    var organisationLocale: String
    var organisationTimezone: String
    var email: EmailIdentity
    var emailSwitchedOff: Bool
}

/// An event as a worker renders it for one recipient (`eventRenderings`).
public struct EventRendering: Sendable {
    /// The event's inputs as notify planned from them (render with `NotificationPlanner.render`).
    public var input: PlanInput
    public var recipient: RecipientProfile
    public var categoryName: String
    public var eventStatus: EventStatus
    public var eventExpiresAt: Date?
    public var url: String?
    public var email: EmailIdentity
    /// The recipient's email for the event's category is off now (read only for deliveries).
    public var emailSwitchedOff = false
}

/// Filters of the outbox listing.
public struct DeliveryFilter: Sendable {
    public var status: DeliveryStatus?
    public var channel: NotificationChannel?
    public var userID: UUID?
    public var eventID: UUID?
    public var endpointID: UUID?
    /// A list (`deliveries`): made at or after. A bulk retry (`retryDeliveries`): reached its
    /// state at or after.
    public var since: Date?
    /// A bulk retry: reached its state before (lists take no `until`).
    public var until: Date?

    public init(
        status: DeliveryStatus? = nil, channel: NotificationChannel? = nil, userID: UUID? = nil, eventID: UUID? = nil,
        endpointID: UUID? = nil, since: Date? = nil, until: Date? = nil
    ) {
        self.status = status
        self.channel = channel
        self.userID = userID
        self.eventID = eventID
        self.endpointID = endpointID
        self.since = since
        self.until = until
    }
}

/// Counts of the outbox for an organisation.
public struct OutboxStats: Sendable, Equatable {
    public var byStatus: [String: Int]
    public var byChannel: [String: Int]
    /// Seconds since the oldest delivery still waiting became due, nil when none waits.
    public var oldestPendingAge: Double?
}

extension Database {
    /// The organisations with deliveries due now (migration 0023), the one waiting longest
    /// first, at most `limit`, with how many rows each has due (counted up to `limit`).
    /// `room` counts only what a claim with it could take (migration 0060): an organisation whose
    /// due rows all wait for full endpoints, or endpoints whose circuit is open, is not listed.
    public func dueDeliveryOrganisations(limit: Int, room: EndpointRoom = .unbounded) async throws -> [(organisation: UUID, due: Int)] {
        let (endpoints, rooms) = room.busyColumns
        return try await query(
            """
            SELECT organisation_id, due
            FROM due_delivery_organisations(\(limit)::integer, \(room.limit)::integer, \(endpoints)::uuid[], \(rooms)::integer[])
            """
        ).map { row in
            let (organisation, due) = try row.decode((UUID, Int).self)
            return (organisation, due)
        }
    }

    /// Puts every delivery whose lease expired back in the queue (or DEAD without attempts
    /// left), logging the lost attempt EXPIRED; returns how many.
    public func rescueExpiredDeliveries(worker: String) async throws -> Int {
        try await query("SELECT rescue_expired_deliveries(\(worker))").first?.decode(Int.self) ?? 0
    }

    /// `TenantTransaction.completeDeliveries` for attempts of `organisation`, then the breakers of
    /// the endpoints that answered those recorded cleared (`recordEndpointAnswers`), in ONE
    /// statement in its own transaction (migration 0039) instead of a transaction of four or five
    /// round trips; run again after a deadlock or serialization failure. Returns, in order,
    /// whether each was recorded.
    public func recordDeliveryAttempts(
        _ attempts: [RecordedAttempt], organisation: UUID, worker: String
    ) async throws -> [Bool] {
        guard !attempts.isEmpty else { return [] }
        let rows = CompletedAttempt.numbered(attempts)
        let recorded = try await retryingConflicts {
            try await query("SELECT record_delivery_attempts(\(organisation), \(worker), \(JSONDocument(rows)))").map {
                try $0.decode(Int.self)
            }
        }
        return flags(recorded, count: attempts.count)
    }

    /// Claims up to `limit` due deliveries across organisations (the one cross-tenant path, a
    /// SECURITY DEFINER function): each comes back leased to `worker` with its attempt number
    /// and endpoint. `organisation` confines the claim to one organisation; there, `room` bounds
    /// the rows of each endpoint (migration 0059: a full endpoint's rows stay due, untouched).
    public func claimDeliveries(
        worker: String, limit: Int, leaseSeconds: Int, organisation: UUID? = nil, room: EndpointRoom = .unbounded
    ) async throws -> [ClaimedDelivery] {
        let (endpoints, rooms) = room.busyColumns
        return try await query(
            """
            SELECT organisation_id, delivery_id, attempt, endpoint_id
            FROM claim_deliveries(\(worker), \(limit)::integer, \(leaseSeconds)::integer, \(organisation)::uuid,
                                  \(room.limit)::integer, \(endpoints)::uuid[], \(rooms)::integer[])
            """
        ).map { row in
            let (org, id, attempt, endpoint) = try row.decode((UUID, UUID, Int, UUID?).self)
            return ClaimedDelivery(organisationID: org, deliveryID: id, attempt: attempt, endpointID: endpoint)
        }
    }
}

extension TenantTransaction {
    /// What sending each of `ids` needs: the delivery, its event, type and templates, recipient,
    /// organisation and endpoint, read in the deliveries' organisation. A claimed batch is read
    /// in three waits however many ids it holds (issue 12: the worker read each delivery in
    /// about ten round trips, then a batch in nine, each a wait): the deliveries; their events
    /// with recipients and the organisation, and their endpoints, sent together; then each
    /// distinct type with its templates and category, sent together. A delivery whose event or
    /// recipient is gone is left out.
    /// (Read from the deliveries in one statement, the events and users were joined by hash, each
    /// call reading every user: 3.6 ms a batch against well under one.)
    public func deliveryWorks(_ ids: [UUID]) async throws -> [UUID: DeliveryWork] {
        guard !ids.isEmpty else { return [:] }
        let deliveries = try await query(
            "SELECT \(unescaped: deliveryColumns) FROM deliveries WHERE organisation_id = \(organisationID) AND id = ANY(\(ids)::uuid[])"
        ).map(decodeDelivery)
        guard !deliveries.isEmpty else { return [:] }
        let (rows, endpoints) = try await read(
            renderingRowsRead(
                deliveries.map { ($0.eventID, $0.userID) },
                emailChecked: Set(deliveries.filter { $0.channel == .email }.map { RenderingKey(eventID: $0.eventID, userID: $0.userID) })),
            // An endpoint deleted meanwhile is absent: its deliveries end "not sent" (the sender's rule).
            endpointsRead(Array(Set(deliveries.compactMap(\.endpointID)))))
        let renderings = try await renderings(of: rows)
        var works: [UUID: DeliveryWork] = [:]
        for delivery in deliveries {
            guard let rendering = renderings[RenderingKey(eventID: delivery.eventID, userID: delivery.userID)] else { continue }
            works[delivery.id] = DeliveryWork(
                organisationID: organisationID, delivery: delivery, input: rendering.input, recipient: rendering.recipient,
                eventStatus: rendering.eventStatus, eventExpiresAt: rendering.eventExpiresAt, url: rendering.url, email: rendering.email,
                endpoint: delivery.endpointID.flatMap { endpoints[$0] },
                emailSwitchedOff: delivery.channel == .email && rendering.emailSwitchedOff, categoryName: rendering.categoryName)
        }
        return works
    }

    /// Events as a worker renders them for their recipients (deliveries, a digest's items), by
    /// (event, recipient): inputs, type and templates, the recipient, and the organisation's name
    /// and sender; a pair whose event or user is not in this organisation is absent. One
    /// statement for the events, users and organisation, then each distinct type with its
    /// templates and category sent together.
    func eventRenderings(_ pairs: [(eventID: UUID, userID: UUID)]) async throws -> [RenderingKey: EventRendering] {
        guard !pairs.isEmpty else { return [:] }
        return try await renderings(of: try await read(renderingRowsRead(pairs)))
    }

    /// Each (event, recipient) of `pairs` once, with what rendering needs but its type. For the
    /// pairs of `emailChecked`, whether the recipient's email for the event's category is off now
    /// (their own setting, else the organisation's default, says disabled or NONE): an
    /// unsubscribe or a preference changed after notify stops an email not yet sent (a trial's
    /// scheduled reminder went out after a one-click unsubscribe). Two key lookups per such pair.
    private func renderingRowsRead(
        _ pairs: [(eventID: UUID, userID: UUID)], emailChecked: Set<RenderingKey> = []
    ) -> StoreRead<[RenderingRow]> {
        let keys = Array(Set(pairs.map { RenderingKey(eventID: $0.eventID, userID: $0.userID) }))
        let statement: PostgresQuery = """
            SELECT p.event_id, p.user_id,
                   e.type_id, e.payload, e.source_actor, e.subject_type, e.subject_id, e.severity, e.priority, e.deliver_at,
                   e.expires_at, e.status, e.url, u.email, u.display_name, u.locale, u.timezone, u.attributes, u.active,
                   o.name, o.slug, o.default_locale, o.default_timezone,
                   o.settings->>'email_from', o.settings->>'email_from_name', o.settings->>'email_reply_to',
                   coalesce(
                       (SELECT NOT (x.enabled AND x.frequency <> 'NONE') FROM preferences x
                        WHERE x.organisation_id = e.organisation_id AND x.user_id = u.id AND x.channel = 'email'
                          AND x.category_id = t.category_id),
                       (SELECT NOT (x.enabled AND x.frequency <> 'NONE') FROM preference_defaults x
                        WHERE x.organisation_id = e.organisation_id AND x.channel = 'email' AND x.category_id = t.category_id),
                       false)
            FROM unnest(\(keys.map(\.eventID))::uuid[], \(keys.map(\.userID))::uuid[], \(keys.map { emailChecked.contains($0) })::boolean[])
                 AS p (event_id, user_id, checked)
            JOIN events e ON e.organisation_id = \(organisationID) AND e.id = p.event_id
            JOIN users u ON u.organisation_id = e.organisation_id AND u.id = p.user_id
            JOIN organisations o ON o.id = e.organisation_id
            -- The event's category, looked up once and only for the pairs checked (none: no lookups).
            LEFT JOIN LATERAL (SELECT t.category_id FROM notification_types t
                               WHERE p.checked AND t.organisation_id = e.organisation_id AND t.id = e.type_id) t ON true
            """
        return StoreRead(statement: statement) { rows in
            try rows.map { row in
                let (
                    eventID, userID, typeID, payload, actor, subjectType, subjectID, severity, priority, deliverAt, expiresAt, status, url,
                    email, name, locale, timezone, attributes, active, orgName, orgSlug, orgLocale, orgTimezone, from, fromName, replyTo,
                    emailOff
                ) =
                    try row.decode(
                        (
                            UUID, UUID, UUID, JSONDocument<JSONValue>, JSONDocument<JSONValue>?, String?, String?, Severity, Priority, Date,
                            Date?, EventStatus, String?,
                            String, String, String?, String?, JSONDocument<JSONValue>, Bool, String, String, String, String, String?,
                            String?,
                            String?, Bool
                        ).self,
                        table: "events")
                let recipient = RecipientProfile(
                    candidate: Candidate(userID: userID, active: active, byUser: true), email: email, displayName: name,
                    locale: locale, timezone: timezone, attributes: attributes.value)
                return RenderingRow(
                    eventID: eventID, typeID: typeID, payload: payload.value, actor: actor?.value, subjectType: subjectType,
                    subjectID: subjectID, severity: severity, priority: priority, deliverAt: deliverAt, expiresAt: expiresAt,
                    status: status,
                    url: url, recipient: recipient, organisationName: orgName, organisationSlug: orgSlug, organisationLocale: orgLocale,
                    organisationTimezone: orgTimezone, email: EmailIdentity(from: from, fromName: fromName, replyTo: replyTo),
                    emailSwitchedOff: emailOff)
            }
        }
    }

    /// `rows` with their types, templates and categories, read together.
    private func renderings(of rows: [RenderingRow]) async throws -> [RenderingKey: EventRendering] {
        let typeIDs = Array(Set(rows.map(\.typeID)))
        guard !typeIDs.isEmpty else { return [:] }
        let (types, templates, categories) = try await read(
            typesRead(ids: typeIDs), templatesRead(typeIDs: typeIDs), categoriesRead(ofTypes: typeIDs))
        var renderings: [RenderingKey: EventRendering] = [:]
        for row in rows {
            guard var type = types[row.typeID] else { throw StoreError.notFound("notification type") }
            type.templates = templates[type.id] ?? [:]
            guard let category = categories[type.id] else { throw StoreError.notFound("notification type") }
            let input = PlanInput(
                eventID: row.eventID, type: TypeProfile(type, category: category), severity: row.severity,
                priority: row.priority, payload: row.payload,
                subjectType: row.subjectType, subjectID: row.subjectID, deliverAt: row.deliverAt, organisationName: row.organisationName,
                organisationSlug: row.organisationSlug, organisationLocale: row.organisationLocale,
                organisationTimezone: row.organisationTimezone, throttlePerMinute: nil, recipients: [row.recipient],
                excluded: [], userPreferences: [:], organisationDefaults: [:], recentCounts: [:],
                sourceActor: row.actor)
            renderings[RenderingKey(eventID: row.eventID, userID: row.recipient.candidate.userID)] = EventRendering(
                input: input, recipient: row.recipient, categoryName: category.name, eventStatus: row.status,
                eventExpiresAt: row.expiresAt, url: row.url, email: row.email, emailSwitchedOff: row.emailSwitchedOff)
        }
        return renderings
    }

    public func delivery(_ id: UUID) async throws -> Delivery {
        guard
            let row = try await query(
                "SELECT \(unescaped: deliveryColumns) FROM deliveries WHERE organisation_id = \(organisationID) AND id = \(id)"
            ).first
        else {
            throw StoreError.notFound("delivery")
        }
        return try decodeDelivery(row)
    }

    public func deliveryAttempts(_ id: UUID) async throws -> [DeliveryAttempt] {
        try await query(
            """
            SELECT attempt, worker, started_at, finished_at, outcome, response_code, error
            FROM delivery_attempts WHERE organisation_id = \(organisationID) AND delivery_id = \(id) ORDER BY attempt
            """
        ).map { row in
            let (attempt, worker, started, finished, outcome, code, error) = try row.decode(
                (Int, String, Date, Date, AttemptOutcome, Int?, String?).self, table: "delivery_attempts")
            return DeliveryAttempt(
                attempt: attempt, worker: worker, startedAt: started, finishedAt: finished, outcome: outcome, responseCode: code,
                error: error)
        }
    }

    /// Extends the leases the worker still holds in this organisation (the heartbeat), fenced
    /// like completion: same worker, same attempt.
    @discardableResult
    public func extendLeases(worker: String, claims: [ClaimedDelivery], leaseSeconds: Int) async throws -> Int {
        try await extendLeases(
            .deliveries, ids: claims.map(\.deliveryID), attempts: claims.map(\.attempt), worker: worker, leaseSeconds: leaseSeconds)
    }

    /// Records how an attempt ended, fenced: only the worker holding the lease for exactly this
    /// attempt can complete the row. Returns false when the fence refused (the lease expired and
    /// the row moved on); the attempt is logged as FENCED then, unless the rescuing claim already
    /// logged it as EXPIRED. A failure on the row's last allowed attempt is DEAD.
    public func completeDelivery(_ claim: ClaimedDelivery, worker: String, startedAt: Date, result: AttemptResult) async throws -> Bool {
        try await completeDeliveries([(claim, startedAt, result)], worker: worker)[0]
    }

    /// `completeDelivery` for many attempts of this organisation in one statement, fenced and
    /// logged the same way: one attempt row each, FENCED for those whose lease had moved on.
    /// Returns, in order, whether each was recorded.
    public func completeDeliveries(
        _ attempts: [(claim: ClaimedDelivery, startedAt: Date, result: AttemptResult)], worker: String
    ) async throws -> [Bool] {
        try await completeDeliveries(
            attempts.map { RecordedAttempt(claim: $0.claim, startedAt: $0.startedAt, result: $0.result) }, worker: worker)
    }

    /// The same, with where each was sent when the row says otherwise.
    public func completeDeliveries(_ attempts: [RecordedAttempt], worker: String) async throws -> [Bool] {
        guard !attempts.isEmpty else { return [] }
        let rows = CompletedAttempt.numbered(attempts)
        // complete_deliveries (0020; 0044 as a set, 0057 clears waiting_since): one fenced UPDATE and one INSERT of the attempts.
        let recorded = try await query(
            "SELECT complete_deliveries(\(worker), \(JSONDocument(rows)))"
        ).map { try $0.decode(Int.self) }
        return flags(recorded, count: attempts.count)
    }

    /// Gives claimed deliveries of this organisation back without counting an attempt: the worker
    /// did not send them (no send slot for their endpoint, the endpoint's circuit is open, no
    /// pooled connection). Fenced like completion; each row is due again at its `until`. Nothing
    /// is logged as an attempt. Returns, in order, whether each was given back.
    public func releaseDeliveries(_ releases: [(claim: ClaimedDelivery, until: Date)], worker: String) async throws -> [Bool] {
        guard !releases.isEmpty else { return [] }
        // release_deliveries (0032; 0057 keeps the first due time): each row by its key, whatever the statistics say.
        let positions = try await query(
            """
            SELECT release_deliveries(\(worker), \(releases.map(\.claim.deliveryID))::uuid[], \(releases.map(\.claim.attempt))::integer[],
                                      \(releases.map(\.until))::timestamptz[])
            """
        ).map { try $0.decode(Int.self) }
        return flags(positions, count: releases.count)
    }

    /// Deliveries newest first: by id, which is time-ordered (UUID v7, made when the delivery
    /// is planned), so the list reads the primary key instead of an index of its own (issue 12:
    /// one index entry less per recipient of a fan-out). `since` also bounds the ids read, a
    /// minute early: an id takes the server's clock, `created_at` the database's. (Ids made before
    /// 2026-12-04 are random, v4; about one in 160 of those is left out of a `since` list.)
    public func deliveries(_ filter: DeliveryFilter, limit: Int, after cursor: PageCursor?) async throws -> Page<Delivery> {
        let earliestID = filter.since.map { TimeOrderedID.lowerBound(at: $0.addingTimeInterval(-60)) }
        let rows = try await query(
            """
            SELECT \(unescaped: deliveryColumns) FROM deliveries
            WHERE organisation_id = \(organisationID)
              AND (\(filter.status)::text IS NULL OR status = \(filter.status))
              AND (\(filter.channel)::text IS NULL OR channel = \(filter.channel))
              AND (\(filter.userID)::uuid IS NULL OR user_id = \(filter.userID))
              AND (\(filter.eventID)::uuid IS NULL OR event_id = \(filter.eventID))
              AND (\(filter.endpointID)::uuid IS NULL OR endpoint_id = \(filter.endpointID))
              AND (\(filter.since)::timestamptz IS NULL OR (created_at >= \(filter.since) AND id >= \(earliestID)))
              AND (\(cursor?.id)::uuid IS NULL OR id < \(cursor?.id))
            ORDER BY id DESC
            LIMIT \(limit + 1)
            """)
        return paginate(try rows.map(decodeDelivery), limit: limit) { PageCursor(time: $0.createdAt, id: $0.id) }
    }

    /// The states a delivery may be retried from, and the attempts it may have in all: the rule
    /// `retryDelivery` applies (and the API's 409 names).
    public static let retryableStatuses: [DeliveryStatus] = [.failed, .dead, .cancelled]
    public static let mostAttempts = 100

    /// Puts a FAILED, DEAD or CANCELLED delivery back in the queue now, with its attempts
    /// budget extended by one (up to `mostAttempts`). Nil when the delivery is in another state,
    /// has used them all, or its event was cancelled.
    public func retryDelivery(_ id: UUID) async throws -> Delivery? {
        _ = try await delivery(id)
        let rows = try await query(
            """
            UPDATE deliveries d SET \(unescaped: retriedState)
            WHERE d.organisation_id = \(organisationID) AND d.id = \(id)
              AND d.status = ANY(\(Self.retryableStatuses.map(\.rawValue))::text[]) AND d.attempts < \(Self.mostAttempts)
              AND NOT \(unescaped: eventCancelled)
            RETURNING d.id
            """)
        return rows.isEmpty ? nil : try await delivery(id)
    }

    /// `retryDelivery` for every delivery `filter` matches (in its status, DEAD when it names
    /// none; a status outside `retryableStatuses` matches nothing), the ones that reached it
    /// first first, up to `limit`, in one statement. `since` and `until` bound when a row reached
    /// its state (its last change), not when it was made: after an outage, the rows that ended
    /// during it (a trial's recovery "since the outage" missed rows made before it and dead
    /// during it). Those of a cancelled event and those at `mostAttempts` are left as they are,
    /// and counted. Returns how many were retried, whether more match (the ones retried no longer
    /// do: the caller may repeat the call), and how many matched but were left.
    public func retryDeliveries(_ filter: DeliveryFilter, limit: Int) async throws -> (retried: Int, more: Bool, skipped: Int) {
        let row = try await query(
            """
            WITH filtered AS MATERIALIZED (
                SELECT d.id, d.updated_at,
                       d.attempts < \(Self.mostAttempts) AND NOT \(unescaped: eventCancelled) AS retryable
                FROM deliveries d
                WHERE d.organisation_id = \(organisationID) AND d.status = \(filter.status ?? .dead)
                  AND d.status = ANY(\(Self.retryableStatuses.map(\.rawValue))::text[])
                  AND (\(filter.channel)::text IS NULL OR d.channel = \(filter.channel))
                  AND (\(filter.userID)::uuid IS NULL OR d.user_id = \(filter.userID))
                  AND (\(filter.eventID)::uuid IS NULL OR d.event_id = \(filter.eventID))
                  AND (\(filter.endpointID)::uuid IS NULL OR d.endpoint_id = \(filter.endpointID))
                  AND (\(filter.since)::timestamptz IS NULL OR d.updated_at >= \(filter.since))
                  AND (\(filter.until)::timestamptz IS NULL OR d.updated_at < \(filter.until))
            ), matching AS MATERIALIZED (
                -- Locked, and checked again as locked: a row another call or a worker changed
                -- meanwhile is no longer in its state.
                SELECT d.id, f.updated_at FROM filtered f
                JOIN deliveries d ON d.organisation_id = \(organisationID) AND d.id = f.id
                WHERE f.retryable AND d.status = \(filter.status ?? .dead)
                ORDER BY f.updated_at, f.id
                LIMIT \(limit + 1)
                FOR UPDATE OF d
            ), retried AS (
                UPDATE deliveries d SET \(unescaped: retriedState)
                FROM (SELECT id FROM matching ORDER BY updated_at, id LIMIT \(limit)) m
                WHERE d.organisation_id = \(organisationID) AND d.id = m.id
                RETURNING d.id
            )
            SELECT (SELECT count(*) FROM retried)::int, (SELECT count(*) FROM matching)::int,
                   (SELECT count(*) FROM filtered WHERE NOT retryable)::int
            """)
        let (retried, matching, skipped) = try row[0].decode((Int, Int, Int).self)
        return (retried, matching > limit, skipped)
    }

    /// Cancels a delivery that has not gone out (PENDING or FAILED). Nil in any other state.
    public func cancelDelivery(_ id: UUID) async throws -> Delivery? {
        _ = try await delivery(id)
        let rows = try await query(
            """
            UPDATE deliveries SET status = 'CANCELLED', last_error = 'Not sent: the delivery was cancelled.', updated_at = now()
            WHERE organisation_id = \(organisationID) AND id = \(id) AND status IN ('PENDING', 'FAILED') RETURNING id
            """
        )
        return rows.isEmpty ? nil : try await delivery(id)
    }

    /// Counts by status and channel, and how long the oldest delivery still waiting has been due:
    /// since its `next_attempt_at`, or, for a row given back unsent (its circuit
    /// open: due again a little later), since it first came due (`waiting_since`, migration 0057).
    public func outboxStats(now: Date) async throws -> OutboxStats {
        var stats = OutboxStats(byStatus: [:], byChannel: [:], oldestPendingAge: nil)
        for row in try await query(
            "SELECT status, channel, count(*)::int FROM deliveries WHERE organisation_id = \(organisationID) GROUP BY 1, 2")
        {
            let (status, channel, count) = try row.decode((String, String, Int).self)
            stats.byStatus[status, default: 0] += count
            stats.byChannel[channel, default: 0] += count
        }
        // Each leg says which of the two due indexes (0059) it walks: emails by due time, each
        // endpoint's rows by due time, and the waits of rows given back among the due rows.
        let oldest = try await query(
            """
            SELECT least(
                (SELECT min(next_attempt_at) FROM deliveries
                 WHERE organisation_id = \(organisationID) AND endpoint_id IS NULL AND status IN ('PENDING', 'FAILED')
                   AND next_attempt_at <= \(now)),
                (SELECT min(f.next_attempt_at) FROM endpoints e
                 CROSS JOIN LATERAL (
                     SELECT d.next_attempt_at FROM deliveries d
                     WHERE d.organisation_id = \(organisationID) AND d.endpoint_id = e.id AND d.status IN ('PENDING', 'FAILED')
                       AND d.next_attempt_at <= \(now)
                     ORDER BY d.next_attempt_at LIMIT 1) f
                 WHERE e.organisation_id = \(organisationID)),
                (SELECT min(waiting_since) FROM deliveries
                 WHERE organisation_id = \(organisationID) AND endpoint_id IS NULL AND status IN ('PENDING', 'FAILED')
                   AND waiting_since <= \(now)),
                (SELECT min(waiting_since) FROM deliveries
                 WHERE organisation_id = \(organisationID) AND endpoint_id IS NOT NULL AND status IN ('PENDING', 'FAILED')
                   AND waiting_since <= \(now)))
            """
        )
        if let due = try oldest.first?.decode(Date?.self) { stats.oldestPendingAge = now.timeIntervalSince(due) }
        return stats
    }
}

/// What a retry makes of a delivery `d` (one or many): due now, with one attempt more than it has
/// used, its last error cleared.
private let retriedState = """
    status = 'PENDING', next_attempt_at = now(), max_attempts = greatest(d.max_attempts, d.attempts + 1),
    last_error = NULL, last_response_code = NULL, waiting_since = NULL, updated_at = now()
    """

/// Whether delivery `d`'s event was cancelled: its deliveries are never retried.
private let eventCancelled = """
    EXISTS (SELECT 1 FROM events e WHERE e.organisation_id = d.organisation_id AND e.id = d.event_id AND e.status = 'CANCELLED')
    """

private let deliveryColumns = """
    id, event_id, user_id, channel, destination, endpoint_id, status, attempts, max_attempts, next_attempt_at, lease_owner, lease_expires_at,
    last_error, last_response_code, last_response, sent_at, created_at, updated_at
    """

private func decodeDelivery(_ row: PostgresRow) throws -> Delivery {
    let (
        id, event, user, channel, destination, endpoint, status, attempts, maxAttempts, next, owner, lease, error, code, response, sent,
        created, updated
    ) =
        try row.decode(
            (
                UUID, UUID, UUID, NotificationChannel, String, UUID?, DeliveryStatus, Int, Int, Date, String?, Date?, String?, Int?,
                String?,
                Date?, Date, Date
            ).self, table: "deliveries")
    return Delivery(
        id: id, eventID: event, userID: user, channel: channel, destination: destination, endpointID: endpoint, status: status,
        attempts: attempts, maxAttempts: maxAttempts, nextAttemptAt: next, leaseOwner: owner, leaseExpiresAt: lease,
        lastError: error, lastResponseCode: code, lastResponse: response, sentAt: sent, createdAt: created, updatedAt: updated)
}
