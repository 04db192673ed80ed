import Foundation
import HeraldCore
import PostgresNIO

/// What a caller asked notify to do, validated. Codable: a recurring schedule stores the request
/// each occurrence sends.
public struct EventRequest: Sendable, Codable, Equatable {
    public var typeKey: String
    public var audience: Audience
    public var payload: JSONValue
    public var sourceActor: JSONValue?
    public var subjectType: String?
    public var subjectID: String?
    public var severity: Severity?
    public var priority: Priority?
    public var deliverAt: Date?
    public var expiresAt: Date?
    public var url: String?
    /// Short `key:value` labels (`team:sales`), stored once on the event; the feed filters by them.
    public var tags: [String]
    /// A schedule's: each occurrence's in-app rows expire this long after it is sent (a weekly
    /// reminder does not pile up in the feed). Notify itself takes `expiresAt`.
    public var expiresAfter: TimeInterval?

    /// `expiresAt` from `expiresAfter` for an occurrence sent at `instant`.
    public mutating func expiring(from instant: Date) {
        if let expiresAfter { expiresAt = instant.addingTimeInterval(expiresAfter) }
    }

    public init(
        typeKey: String, audience: Audience, payload: JSONValue, sourceActor: JSONValue? = nil, subjectType: String? = nil,
        subjectID: String? = nil, severity: Severity? = nil, priority: Priority? = nil, deliverAt: Date? = nil, expiresAt: Date? = nil,
        url: String? = nil, tags: [String] = []
    ) {
        self.url = url
        self.tags = tags
        self.typeKey = typeKey
        self.audience = audience
        self.payload = payload
        self.sourceActor = sourceActor
        self.subjectType = subjectType
        self.subjectID = subjectID
        self.severity = severity
        self.priority = priority
        self.deliverAt = deliverAt
        self.expiresAt = expiresAt
    }
}

/// A notification type key that does not exist in the organisation.
public struct UnknownNotificationType: Error, Sendable, Equatable {
    public var key: String
}

/// The engine's decisions for a request, with what notify needs to write them.
public struct PlannedEvent: Sendable {
    public var event: NewEvent
    public var type: TypeProfile
    public var plan: Plan
    /// The users read (all of the audience, or the chunk's), in id order.
    public var recipients: [RecipientProfile]
}

extension TypeProfile {
    /// A stored type with its category, as the engine plans and the workers render from it.
    init(_ type: NotificationType, category: Category) {
        self.init(
            id: type.id, key: type.key, name: type.name, categoryID: category.id, categoryKey: category.key,
            categoryIsCritical: category.critical, defaultChannels: Set(type.defaultChannels), defaultSeverity: type.defaultSeverity,
            defaultPriority: type.defaultPriority, templates: type.templates)
    }
}

/// One chunk of a large audience (a chunked fan-out, migration 0021): the users after `after`,
/// at most `limit`, of an event whose delivery time was fixed when it was accepted.
public struct AudienceChunk: Sendable {
    public var after: UUID?
    public var limit: Int
    public var deliverAt: Date
    /// Whether the audience's names are checked (a dry run's first chunk); a fan-out's were
    /// checked when its event was accepted.
    public var checksNames: Bool

    public init(after: UUID?, limit: Int, deliverAt: Date, checksNames: Bool = false) {
        self.after = after
        self.limit = limit
        self.deliverAt = deliverAt
        self.checksNames = checksNames
    }
}

/// A dry run's plan (`planDryRun`): the counts of the whole audience and the decisions of one
/// page of it.
public struct DryRunPlan: Sendable {
    public var counts = DecisionCounts()
    /// The first users of the page, by user id.
    public var traces: [RecipientTrace] = []
    /// More users follow the page.
    public var more = false
}

extension TenantTransaction {
    /// Gathers everything the planner needs in a few set-based queries and runs it. Writes
    /// nothing: notify writes the result with `write`, a dry run just shows it. With `chunk`, it
    /// plans that chunk of the audience only.
    public func planEvent(
        _ request: EventRequest, eventID: UUID, now: Date, idempotencyKey: String? = nil, requestHash: String? = nil,
        chunk: AudienceChunk? = nil
    ) async throws -> PlannedEvent {
        // What does not depend on another answer is sent together (`read`: one wait, not one a
        // statement): the type, its templates and category, the organisation's settings and
        // defaults, the endpoints, the audience's unknown names (a chunk's were checked when its
        // event was accepted) and its users.
        // An audience of named users only (most notifies) has its users' settings read with them.
        let key = request.typeKey
        let audience = request.audience
        let named = chunk == nil && !audience.everyone && audience.roleKeys.isEmpty && audience.groupKeys.isEmpty
        let (found, templates, foundCategory, settings, defaults, endpoints, unknown, recipients, namedPreferences) = try await read(
            typeRead(key: key), templatesRead(typeKey: key), categoryRead(typeKey: key), engineSettingsRead(), preferenceDefaultsRead(),
            endpointTargetsRead(typeKey: key), unknownAudienceRead(chunk?.checksNames ?? true ? audience : Audience()),
            recipientsRead(for: audience, after: chunk?.after, limit: chunk?.limit, typeKey: key),
            preferencesRead(forTypeKey: key, users: named ? audience.userIDs : []))
        guard var type = found else { throw UnknownNotificationType(key: key) }
        type.templates = templates
        // The category is read through the type's key: none means the type went meanwhile.
        guard let category = foundCategory else { throw UnknownNotificationType(key: key) }
        if let unknown { throw unknown }
        let profile = TypeProfile(type, category: category)
        // The recipients' own settings only (a one-user notify read every user's of the category),
        // unless they are too many to name in a statement (a dry run to everyone).
        let users = chunk != nil || recipients.count <= 10_000 ? recipients.map(\.candidate.userID) : nil
        // What needs the category or the users: sent together, each only when it is needed.
        let (userPreferences, recentCounts, recentTotals) = try await read(
            named ? .ready(namedPreferences) : preferencesRead(forCategory: category.id, users: users),
            settings.throttlePerMinute == nil ? .ready([:]) : recentNotifiedRead(categoryID: category.id, now: now, users: users),
            settings.userThrottlePerMinute == nil ? .ready([:]) : recentNotifiedRead(categoryID: nil, now: now, users: users))
        let deliverAt = chunk?.deliverAt ?? max(request.deliverAt ?? now, now)
        let severity = request.severity ?? type.defaultSeverity
        let priority = request.priority ?? type.defaultPriority
        var input = PlanInput(
            eventID: eventID, type: profile, severity: severity, priority: priority, payload: request.payload,
            subjectType: request.subjectType, subjectID: request.subjectID, deliverAt: deliverAt,
            organisationName: settings.name, organisationSlug: settings.slug, organisationLocale: settings.defaultLocale,
            organisationTimezone: settings.defaultTimezone, throttlePerMinute: settings.throttlePerMinute, recipients: recipients,
            excluded: Set(request.audience.excludeUserIDs), userPreferences: userPreferences,
            organisationDefaults: defaults.settings(forCategory: category.id), recentCounts: recentCounts,
            endpoints: endpoints, sourceActor: request.sourceActor,
            userThrottlePerMinute: settings.userThrottlePerMinute, recentTotals: recentTotals)
        // A chunk's in-app rows are keyed at the time it is written, not the event's: a "mark
        // all read" clicked while earlier chunks were written must not cover them (the settled
        // watermark assumes no notify transaction runs longer than the settling time).
        if chunk != nil { input.notificationTime = max(deliverAt, now) }
        input.expiresAt = request.expiresAt
        let event = NewEvent(
            id: eventID, typeID: type.id, request: request, severity: severity, priority: priority, deliverAt: deliverAt,
            idempotencyKey: idempotencyKey, requestHash: requestHash)
        return PlannedEvent(event: event, type: profile, plan: NotificationPlanner.plan(input), recipients: recipients)
    }

    /// What a template preview renders with: the type of `request` with its stored templates,
    /// and the organisation's name and defaults, as notify reads them, with no audience.
    public func previewInput(_ request: EventRequest, now: Date) async throws -> PlanInput {
        let key = request.typeKey
        let (found, templates, foundCategory, settings) = try await read(
            typeRead(key: key), templatesRead(typeKey: key), categoryRead(typeKey: key), engineSettingsRead())
        guard var type = found, let category = foundCategory else { throw UnknownNotificationType(key: key) }
        type.templates = templates
        return PlanInput(
            eventID: UUID(), type: TypeProfile(type, category: category), severity: request.severity ?? type.defaultSeverity,
            priority: request.priority ?? type.defaultPriority, payload: request.payload, subjectType: request.subjectType,
            subjectID: request.subjectID, deliverAt: max(request.deliverAt ?? now, now), organisationName: settings.name,
            organisationSlug: settings.slug, organisationLocale: settings.defaultLocale, organisationTimezone: settings.defaultTimezone,
            throttlePerMinute: nil, recipients: [], excluded: [], userPreferences: [:], organisationDefaults: [:], recentCounts: [:],
            endpoints: [:], sourceActor: request.sourceActor, userThrottlePerMinute: nil, recentTotals: [:])
    }

    /// Plans `request` as notify would, writing nothing, `chunkSize` users at a time in the order
    /// a chunked fan-out writes them (by user id), so that one chunk's users, settings and plan are
    /// in memory at a time, not the whole audience's: a dry run to everyone of an organisation of a
    /// million users held the million (about 1.5 KB each). The counts cover the whole audience; the
    /// page is the first `limit` users after `after`.
    public func planDryRun(_ request: EventRequest, now: Date, limit: Int, after: UUID?, chunkSize: Int) async throws -> DryRunPlan {
        let eventID = UUID()
        let deliverAt = max(request.deliverAt ?? now, now)
        let start = after?.uuidString
        var result = DryRunPlan()
        var cursor: UUID?
        repeat {
            let planned = try await planEvent(
                request, eventID: eventID, now: now,
                chunk: AudienceChunk(after: cursor, limit: chunkSize, deliverAt: deliverAt, checksNames: cursor == nil))
            result.counts = result.counts + planned.plan.counts
            // uuidString's order is the bytes' order, PostgreSQL's for uuid.
            let ordered = planned.plan.traces.map { ($0.targeting.userID.uuidString, $0) }.sorted { $0.0 < $1.0 }
            for (id, trace) in ordered where start.map({ id > $0 }) ?? true {
                if result.traces.count < limit { result.traces.append(trace) } else { result.more = true }
            }
            cursor = planned.recipients.count < chunkSize ? nil : planned.recipients.last?.candidate.userID
        } while cursor != nil
        return result
    }
}
