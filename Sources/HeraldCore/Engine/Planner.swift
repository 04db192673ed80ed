import Foundation

/// A notification type as the engine needs it, with its category.
public struct TypeProfile: Sendable, Equatable {
    public var id: UUID
    public var key: String
    public var name: String
    public var categoryID: UUID
    public var categoryKey: String
    public var categoryIsCritical: Bool
    public var defaultChannels: Set<NotificationChannel>
    public var defaultSeverity: Severity
    public var defaultPriority: Priority
    /// Templates by channel, then locale.
    public var templates: [NotificationChannel: [String: TemplateContent]]

    public init(
        id: UUID, key: String, name: String, categoryID: UUID, categoryKey: String, categoryIsCritical: Bool,
        defaultChannels: Set<NotificationChannel>, defaultSeverity: Severity, defaultPriority: Priority,
        templates: [NotificationChannel: [String: TemplateContent]]
    ) {
        self.id = id
        self.key = key
        self.name = name
        self.categoryID = categoryID
        self.categoryKey = categoryKey
        self.categoryIsCritical = categoryIsCritical
        self.defaultChannels = defaultChannels
        self.defaultSeverity = defaultSeverity
        self.defaultPriority = defaultPriority
        self.templates = templates
    }
}

/// A user the audience reached, with what rendering and decisions need.
public struct RecipientProfile: Sendable, Equatable {
    public var candidate: Candidate
    public var email: String
    public var displayName: String
    public var locale: String?
    public var timezone: String?
    public var attributes: JSONValue
    /// When the recipient wants no email but critical ones (in `timezone`, else the
    /// organisation's); nil: none.
    public var quietHours: QuietHours?

    public init(
        candidate: Candidate, email: String, displayName: String, locale: String?, timezone: String?, attributes: JSONValue,
        quietHours: QuietHours? = nil
    ) {
        self.candidate = candidate
        self.email = email
        self.displayName = displayName
        self.locale = locale
        self.timezone = timezone
        self.attributes = attributes
        self.quietHours = quietHours
    }
}

extension RecipientProfile {
    /// The profile with what is personal to the recipient left empty (their locale stays, as it
    /// picks the template).
    var withoutPersonalDetails: RecipientProfile {
        RecipientProfile(candidate: candidate, email: "", displayName: "", locale: locale, timezone: nil, attributes: .object([:]))
    }
}

/// Everything one call of notify decides from, gathered by the store.
public struct PlanInput: Sendable {
    public var eventID: UUID
    public var type: TypeProfile
    public var severity: Severity
    public var priority: Priority
    public var payload: JSONValue
    public var subjectType: String?
    public var subjectID: String?
    public var deliverAt: Date
    public var organisationName: String
    public var organisationSlug: String
    public var organisationLocale: String
    public var organisationTimezone: String
    /// Per user, per category, per minute; nil switches the throttle off.
    public var throttlePerMinute: Int?
    public var recipients: [RecipientProfile]
    public var excluded: Set<UUID>
    public var userPreferences: [UUID: [NotificationChannel: PreferenceSetting]]
    public var organisationDefaults: [NotificationChannel: PreferenceSetting]
    /// Notified events of this category per user in the last minute.
    public var recentCounts: [UUID: Int]
    /// Per user across every category, per minute; nil switches this throttle off.
    public var userThrottlePerMinute: Int?
    /// Notified events of any category per user in the last minute.
    public var recentTotals: [UUID: Int]
    /// The enabled webhook and chat endpoints that take this event's type, by channel; email
    /// always has the user's address, in-app always has the feed.
    public var endpoints: [NotificationChannel: [EndpointTarget]]
    /// Who caused the event in the tenant's domain; templates see it as `actor`.
    public var sourceActor: JSONValue?
    /// The time in-app rows' ids are made at (they sort the feed); nil: `deliverAt`.
    public var notificationTime: Date?
    /// When the event expires (nothing is sent after it); nil: never.
    public var expiresAt: Date?

    public init(
        eventID: UUID, type: TypeProfile, severity: Severity, priority: Priority, payload: JSONValue,
        subjectType: String?, subjectID: String?, deliverAt: Date, organisationName: String, organisationSlug: String,
        organisationLocale: String, organisationTimezone: String, throttlePerMinute: Int?, recipients: [RecipientProfile],
        excluded: Set<UUID>, userPreferences: [UUID: [NotificationChannel: PreferenceSetting]],
        organisationDefaults: [NotificationChannel: PreferenceSetting], recentCounts: [UUID: Int],
        endpoints: [NotificationChannel: [EndpointTarget]] = [:],
        sourceActor: JSONValue? = nil, userThrottlePerMinute: Int? = nil, recentTotals: [UUID: Int] = [:]
    ) {
        self.sourceActor = sourceActor
        self.userThrottlePerMinute = userThrottlePerMinute
        self.recentTotals = recentTotals
        self.eventID = eventID
        self.type = type
        self.severity = severity
        self.priority = priority
        self.payload = payload
        self.subjectType = subjectType
        self.subjectID = subjectID
        self.deliverAt = deliverAt
        self.organisationName = organisationName
        self.organisationSlug = organisationSlug
        self.organisationLocale = organisationLocale
        self.organisationTimezone = organisationTimezone
        self.throttlePerMinute = throttlePerMinute
        self.recipients = recipients
        self.excluded = excluded
        self.userPreferences = userPreferences
        self.organisationDefaults = organisationDefaults
        self.recentCounts = recentCounts
        self.endpoints = endpoints
    }
}

/// One channel of one recipient in the trace, with the rows it produced.
public struct TracedChannel: Sendable, Equatable, Codable {
    public var decision: ChannelDecision
    public var notificationID: UUID?
    /// The outbox rows: one for email, one per matching endpoint for webhook and chat.
    public var deliveryIDs: [UUID]
    public var digestItemID: UUID?

    /// The first outbox row (the only one for email).
    public var deliveryID: UUID? { deliveryIDs.first }

    public init(decision: ChannelDecision, notificationID: UUID? = nil, deliveryIDs: [UUID] = [], digestItemID: UUID? = nil) {
        self.decision = decision
        self.notificationID = notificationID
        self.deliveryIDs = deliveryIDs
        self.digestItemID = digestItemID
    }
}

/// The trace of one user the engine considered.
public struct RecipientTrace: Sendable, Equatable {
    public var targeting: TargetingDecision
    public var channels: [TracedChannel]

    /// Whether any channel produced something (counts toward the throttle).
    public var notified: Bool { channels.contains { $0.decision.outcome != .skipped } }
}

/// An in-app row to write.
public struct PlannedNotification: Sendable, Equatable {
    public var id: UUID
    public var userID: UUID
    public var title: String
    public var body: String
    /// What the recipient's template says to anyone: rendered with the recipient's name, email
    /// and attributes left empty. Stored once per event and searched; `title` and `body` are
    /// stored with the row only when they differ from it (migration 0025).
    public var shared: TemplateContent
}

/// An outbox row to write.
public struct PlannedDelivery: Sendable, Equatable {
    public var id: UUID
    public var userID: UUID
    public var channel: NotificationChannel
    /// The email address, or the endpoint's URL for webhook and chat.
    public var destination: String
    /// The webhook or chat endpoint; nil for email.
    public var endpointID: UUID?
    /// When it may be sent, if later than the event: the end of the recipient's quiet hours.
    public var notBefore: Date?

    public init(
        id: UUID, userID: UUID, channel: NotificationChannel, destination: String, endpointID: UUID? = nil, notBefore: Date? = nil
    ) {
        self.id = id
        self.userID = userID
        self.channel = channel
        self.destination = destination
        self.endpointID = endpointID
        self.notBefore = notBefore
    }
}

/// A webhook or chat endpoint that takes this event's type.
public struct EndpointTarget: Sendable, Equatable {
    public var id: UUID
    public var url: String

    public init(id: UUID, url: String) {
        self.id = id
        self.url = url
    }
}

/// A digest item to write.
public struct PlannedDigestItem: Sendable, Equatable {
    public var id: UUID
    public var userID: UUID
    public var channel: NotificationChannel
    public var frequency: Frequency
}

/// What notify answers with: how many of each decision.
public struct DecisionCounts: Sendable, Equatable, Codable {
    public var considered = 0
    public var targeted = 0
    public var notTargeted = 0
    public var inApp = 0
    public var immediate = 0
    public var digest = 0
    public var skipped = 0
    /// Of `skipped`: channels a per-minute limit stopped (THROTTLED).
    public var throttled = 0
    /// Of `immediate`: emails held until the recipient's quiet hours end (HELD_QUIET_HOURS).
    public var held = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case considered, targeted, inApp = "in_app", immediate, digest, skipped, throttled, held
        case notTargeted = "not_targeted"
    }

    /// Events stored before `throttled` and `held` were counted read them as 0.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        considered = try c.decode(Int.self, forKey: .considered)
        targeted = try c.decode(Int.self, forKey: .targeted)
        notTargeted = try c.decode(Int.self, forKey: .notTargeted)
        inApp = try c.decode(Int.self, forKey: .inApp)
        immediate = try c.decode(Int.self, forKey: .immediate)
        digest = try c.decode(Int.self, forKey: .digest)
        skipped = try c.decode(Int.self, forKey: .skipped)
        throttled = try c.decodeIfPresent(Int.self, forKey: .throttled) ?? 0
        held = try c.decodeIfPresent(Int.self, forKey: .held) ?? 0
    }
}

/// Everything notify writes, decided before anything is written (and all a dry run shows).
public struct Plan: Sendable {
    public var traces: [RecipientTrace]
    public var notifications: [PlannedNotification]
    public var deliveries: [PlannedDelivery]
    public var digestItems: [PlannedDigestItem]
    public var counts: DecisionCounts
    /// The organisation had a per-minute limit set (per category or per user): the trace rows
    /// of this plan count toward the limits of later events (0053).
    public var countedByLimits = false
}

/// The engine's decisions for one event, as a pure function of its inputs.
public enum NotificationPlanner {
    public static func plan(_ input: PlanInput) -> Plan {
        let targeting = AudienceResolver.decide(input.recipients.map(\.candidate), excluding: input.excluded)
        let profiles = Dictionary(input.recipients.map { ($0.candidate.userID, $0) }, uniquingKeysWith: { first, _ in first })
        var plan = Plan(traces: [], notifications: [], deliveries: [], digestItems: [], counts: DecisionCounts())
        plan.countedByLimits = input.throttlePerMinute != nil || input.userThrottlePerMinute != nil
        // Each template is parsed once, not once per recipient.
        let parsed = input.type.templates.mapValues { $0.mapValues { ParsedTemplate($0) } }
        // The in-app text every recipient of a locale shares, rendered once per locale, and the
        // in-app template picked for each locale once (by the recipient's locale, "" for none).
        var shared: [String: TemplateContent] = [:]
        var inAppTemplates: [String: ParsedTemplate?] = [:]
        // What the context says of the event, built once: only `recipient` differs per recipient.
        let eventContext = context(input)
        // A critical category or a critical event is sent whatever the recipient's quiet hours.
        let critical = input.type.categoryIsCritical || input.priority == .critical
        for target in targeting {
            plan.counts.considered += 1
            guard target.targeted, let profile = profiles[target.userID] else {
                plan.counts.notTargeted += 1
                plan.traces.append(RecipientTrace(targeting: target, channels: []))
                continue
            }
            plan.counts.targeted += 1
            let timeZone = TimeZone(identifier: profile.timezone ?? input.organisationTimezone) ?? .gmt
            // Conditions see the payload, the type and the recipient's attributes, on the day the
            // event is delivered.
            let subject = ConditionSubject(
                payload: input.payload, eventType: input.type.key, recipientAttributes: profile.attributes, timeZone: timeZone,
                now: input.deliverAt)
            // Either limit stops a non-critical notification: the category's or the user's total.
            let throttled =
                input.throttlePerMinute.map { (input.recentCounts[target.userID] ?? 0) >= $0 } ?? false
                || input.userThrottlePerMinute.map { (input.recentTotals[target.userID] ?? 0) >= $0 } ?? false
            var channels: [TracedChannel] = []
            for channel in NotificationChannel.allCases {
                let preference = PreferenceResolver.resolve(
                    channel: channel, categoryIsCritical: input.type.categoryIsCritical,
                    typeDefaultChannels: input.type.defaultChannels,
                    user: channel.isPersonal ? input.userPreferences[target.userID]?[channel] : nil,
                    organisationDefault: input.organisationDefaults[channel])
                let destinations = channel.destinations(for: profile, endpoints: input.endpoints[channel] ?? [])
                // The bell row of a critical event passes the limits, as a critical category's does.
                var decision = ChannelDecider.decide(
                    channel: channel, preference: preference, subject: subject,
                    throttled: throttled && !(channel == .inApp && input.priority == .critical),
                    hasDestination: !destinations.isEmpty)
                // An email inside the recipient's quiet hours waits for their end, unless it is
                // critical; one whose event expires first is not queued at all.
                var held: Date?
                if decision.outcome == .immediate, channel == .email, !critical,
                    let until = profile.quietHours?.heldUntil(input.deliverAt, in: timeZone)
                {
                    if let expiry = input.expiresAt, expiry <= until {
                        decision = ChannelDecision(
                            channel: channel, preference: decision.preference, outcome: .skipped, reason: .expiresInQuietHours)
                    } else {
                        decision.reason = .heldForQuietHours
                        held = until
                        plan.counts.held += 1
                    }
                }
                var traced = TracedChannel(decision: decision)
                switch decision.outcome {
                case .inApp:
                    let key = profile.locale ?? ""
                    let template: ParsedTemplate?
                    if let picked = inAppTemplates[key] {
                        template = picked
                    } else {
                        template =
                            TemplateRenderer.pick(
                                parsed[.inApp] ?? [:], userLocale: profile.locale, organisationLocale: input.organisationLocale)?
                            .value
                        inAppTemplates[key] = template
                    }
                    let content = InAppText.bounded(render(template, input, profile, eventContext: eventContext))
                    let common =
                        shared[key]
                        ?? InAppText.bounded(render(template, input, profile.withoutPersonalDetails, eventContext: eventContext))
                    shared[key] = common
                    let id = TimeOrderedID.make(at: input.notificationTime ?? input.deliverAt)
                    plan.notifications.append(
                        PlannedNotification(
                            id: id, userID: target.userID, title: content.subject, body: content.body, shared: common))
                    traced.notificationID = id
                    plan.counts.inApp += 1
                case .immediate:
                    let planned = destinations.map {
                        PlannedDelivery(
                            id: TimeOrderedID.make(), userID: target.userID, channel: channel, destination: $0.address,
                            endpointID: $0.endpointID, notBefore: held)
                    }
                    plan.deliveries += planned
                    traced.deliveryIDs = planned.map(\.id)
                    plan.counts.immediate += planned.count
                case .digest:
                    let id = TimeOrderedID.make()
                    plan.digestItems.append(
                        PlannedDigestItem(id: id, userID: target.userID, channel: channel, frequency: preference.frequency))
                    traced.digestItemID = id
                    plan.counts.digest += 1
                case .skipped:
                    plan.counts.skipped += 1
                    if decision.reason == .throttled { plan.counts.throttled += 1 }
                }
                channels.append(traced)
            }
            plan.traces.append(RecipientTrace(targeting: target, channels: channels))
        }
        return plan
    }

    /// The rendering context a template sees: `payload`, `recipient`, `organisation`, `event`.
    /// `links` (the tracked link and the unsubscribe link) exist only when a delivery is sent.
    public static func context(_ input: PlanInput, _ profile: RecipientProfile, links: [String: String] = [:]) -> [String: Any] {
        context(input, profile, links: links, eventContext: context(input))
    }

    /// The parts of the context that are the same for every recipient of the event (`payload`,
    /// `organisation`, `actor`, `event`): a plan builds them once, not once per recipient.
    static func context(_ input: PlanInput) -> [String: Any] {
        [
            "payload": input.payload.plain,
            "organisation": ["name": input.organisationName, "slug": input.organisationSlug],
            "actor": input.sourceActor?.plain ?? [String: Any](),
            "event": [
                "id": input.eventID.lowercased, "type": input.type.key, "severity": input.severity.rawValue,
                "priority": input.priority.rawValue, "subject_type": input.subjectType ?? "", "subject_id": input.subjectID ?? "",
            ],
        ]
    }

    /// `eventContext` with the recipient's part and the links.
    static func context(
        _ input: PlanInput, _ profile: RecipientProfile, links: [String: String], eventContext: [String: Any]
    ) -> [String: Any] {
        scope(input, profile, links: links, eventContext: eventContext).merged
    }

    /// The same context, the recipient's part apart from the event's.
    static func scope(
        _ input: PlanInput, _ profile: RecipientProfile, links: [String: String], eventContext: [String: Any]
    ) -> TemplateScope {
        TemplateScope(
            shared: eventContext,
            own: [
                "links": links,
                "recipient": [
                    "display_name": profile.displayName, "email": profile.email,
                    "locale": profile.locale ?? input.organisationLocale, "timezone": profile.timezone ?? input.organisationTimezone,
                    "attributes": profile.attributes.plain,
                ] as [String: Any],
            ])
    }

    /// The recipient's content for `channel`: the template in their locale, or the type's name.
    /// `escaping`: how values in the subject and text are escaped (`.text` for an email's header
    /// and text part, `.mattermost` for its Markdown).
    public static func render(
        _ input: PlanInput, _ profile: RecipientProfile, channel: NotificationChannel,
        parsed: [NotificationChannel: [String: ParsedTemplate]]? = nil, links: [String: String] = [:], escaping: ValueEscaping = .html
    ) -> TemplateContent {
        render(input, profile, channel: channel, parsed: parsed, links: links, escaping: escaping, eventContext: nil)
    }

    /// What the recipient gets on an outbox channel (email, webhook, chat): its own template, or
    /// the in-app one when the type has none for it, escaped as the channel needs
    /// (`ValueEscaping.of`). The workers send this; a preview shows it.
    public static func outboxContent(
        _ input: PlanInput, _ profile: RecipientProfile, channel: NotificationChannel, links: [String: String], escaping: ValueEscaping
    ) -> TemplateContent {
        render(input, profile, channel: templateChannel(input, for: channel), links: links, escaping: escaping)
    }

    /// The channel whose templates render `channel`: its own, or in-app's when it has none.
    public static func templateChannel(_ input: PlanInput, for channel: NotificationChannel) -> NotificationChannel {
        (input.type.templates[channel] ?? [:]).isEmpty ? .inApp : channel
    }

    /// The in-app row's title and text for the recipient: the template notify picks, with the
    /// context and bounds notify gives it (notify itself renders through its cache of parsed
    /// templates and the event's shared context, to the same result).
    public static func inAppContent(_ input: PlanInput, _ profile: RecipientProfile) -> TemplateContent {
        InAppText.bounded(render(input, profile, channel: .inApp))
    }

    /// `render`, with the event's part of the context built already (`context(_:)`) when given.
    /// `parsed` templates are parsed for HTML: used only when `escaping` is `.html`.
    static func render(
        _ input: PlanInput, _ profile: RecipientProfile, channel: NotificationChannel,
        parsed: [NotificationChannel: [String: ParsedTemplate]]?, links: [String: String] = [:], escaping: ValueEscaping = .html,
        eventContext: [String: Any]?
    ) -> TemplateContent {
        let template: ParsedTemplate?
        if let parsed, escaping == .html {
            template =
                TemplateRenderer.pick(parsed[channel] ?? [:], userLocale: profile.locale, organisationLocale: input.organisationLocale)?
                .value
        } else {
            // Only the template picked is parsed (or found parsed): not every channel and locale of the type.
            template = TemplateRenderer.pick(
                input.type.templates[channel] ?? [:], userLocale: profile.locale, organisationLocale: input.organisationLocale
            ).map { ParsedTemplate.cached($0.value, escaping: escaping) }
        }
        return render(template, input, profile, links: links, eventContext: eventContext ?? context(input))
    }

    /// The recipient's content from a template already picked (nil: the type's name).
    static func render(
        _ template: ParsedTemplate?, _ input: PlanInput, _ profile: RecipientProfile, links: [String: String] = [:],
        eventContext: [String: Any]
    ) -> TemplateContent {
        guard let template else { return TemplateContent(subject: input.type.name, body: "") }
        var content = template.render(scope(input, profile, links: links, eventContext: eventContext))
        // A subject that renders empty (none given, or a variable the payload lacks) is the type's
        // name, as with no template: not an email without a Subject, nor a bell row without a title.
        if content.subject.allSatisfy(\.isWhitespace) { content.subject = input.type.name }
        return content
    }
}

/// The bounds of an in-app row's text: a template that prints a large payload value (a whole
/// document) would otherwise make a title of that size in every feed page that shows it (a trial
/// made a 900 KB title and a 1.8 MB page). Cut text ends with "…", never inside an HTML entity.
public enum InAppText {
    public static let titleLimit = 1_000
    public static let bodyLimit = 10_000

    static func bounded(_ content: TemplateContent) -> TemplateContent {
        var content = content
        content.subject = cut(content.subject, to: titleLimit)
        content.body = cut(content.body, to: bodyLimit)
        return content
    }

    static func cut(_ text: String, to limit: Int) -> String {
        guard text.count > limit else { return text }
        var kept = text.prefix(limit - 1)
        // An entity (`&amp;`) cut in two would show as text: cut before it instead.
        if let amp = kept.lastIndex(of: "&"), !kept[amp...].contains(";") { kept = kept[..<amp] }
        return kept + "…"
    }
}
