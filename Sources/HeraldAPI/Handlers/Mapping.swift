import Foundation
import HeraldCore
import HeraldStore
import Logging

// Domain values → the generated API schemas. The only place that knows both shapes.

extension Components.Schemas.Organisation {
    /// The organisation with the limits it runs under: its own where the operator set them, the
    /// instance's otherwise.
    init(_ o: Organisation, limits own: RateLimitSettings, instance: InstanceRateLimits) {
        self.init(
            id: o.id.lowercased, slug: o.slug, name: o.name, defaultLocale: o.defaultLocale,
            defaultTimezone: o.defaultTimezone, throttlePerMinute: o.throttlePerMinute,
            userThrottlePerMinute: o.userThrottlePerMinute, emailFrom: o.emailFrom,
            emailFromName: o.emailFromName, emailReplyTo: o.emailReplyTo, digestHour: o.digestHour, digestWeekday: o.digestWeekday,
            retentionDays: o.retentionDays, inactivityEnabled: o.inactivity.enabled, inactivityDays: o.inactivity.days,
            inactivityGraceDays: o.inactivity.graceDays,
            rateLimits: .init(
                requestsPerSecond: own.requestsPerSecond ?? instance.requests,
                requestsSource: own.requestsPerSecond == nil ? .instance : .organisation,
                eventsPerSecond: own.eventsPerSecond ?? instance.events,
                eventsSource: own.eventsPerSecond == nil ? .instance : .organisation, burstSeconds: instance.burstSeconds),
            createdAt: o.createdAt, updatedAt: o.updatedAt)
    }
}

extension Components.Schemas.User {
    init(_ u: User) throws {
        self.init(
            id: u.id.lowercased, email: u.email, displayName: u.displayName, locale: u.locale, timezone: u.timezone,
            digestHour: u.digestHour, digestWeekday: u.digestWeekday, quietHours: u.quietHours.map(Components.Schemas.QuietHours.init),
            active: u.active, attributes: try convert(u.attributes),
            roles: u.roles.map { .init(id: $0.id.lowercased, key: $0.key) }, lastEngagedAt: u.lastEngagedAt,
            inactivityWarnedAt: u.inactivityWarnedAt, inactivitySwitchedOffAt: u.inactivitySwitchedOffAt, createdAt: u.createdAt,
            updatedAt: u.updatedAt)
    }
}

extension Components.Schemas.QuietHours {
    init(_ q: QuietHours) {
        self.init(start: q.startText, end: q.endText)
    }
}

extension Components.Schemas.Role {
    init(_ r: Role) {
        self.init(
            id: r.id.lowercased, key: r.key, name: r.name, description: r.description, builtin: r.builtin,
            permissions: r.permissions.sorted().map(\.rawValue), createdAt: r.createdAt, updatedAt: r.updatedAt)
    }
}

extension Components.Schemas.Group {
    init(_ g: Group) {
        self.init(
            id: g.id.lowercased, key: g.key, name: g.name, description: g.description, memberCount: g.memberCount,
            createdAt: g.createdAt, updatedAt: g.updatedAt)
    }
}

extension Components.Schemas.ApiKey {
    init(_ k: ApiKey, organisationID: UUID) {
        self.init(
            id: k.id.lowercased, name: k.name, roleId: k.roleID.lowercased,
            prefix: OpaqueToken.prefix(kind: .apiKey, organisationID: organisationID, id: k.id),
            createdAt: k.createdAt, lastUsedAt: k.lastUsedAt, expiresAt: k.expiresAt, revokedAt: k.revokedAt)
    }
}

extension Components.Schemas.AuditEntry {
    init(_ e: AuditEntry) throws {
        self.init(
            id: e.id.lowercased, occurredAt: e.occurredAt,
            actorType: mapped(e.actorType), actorId: e.actorID?.lowercased,
            action: e.action, targetType: e.targetType, targetId: e.targetID,
            before: try e.before.map { try convert($0) }, after: try e.after.map { try convert($0) },
            requestId: e.requestID)
    }
}

extension Components.Schemas.Category {
    init(_ c: HeraldStore.Category) {
        self.init(
            id: c.id.lowercased, key: c.key, name: c.name, description: c.description, critical: c.critical,
            createdAt: c.createdAt, updatedAt: c.updatedAt)
    }
}

extension Components.Schemas.NotificationType {
    init(_ t: HeraldStore.NotificationType) throws {
        let templates = t.templates.sorted { $0.key < $1.key }.flatMap { channel, byLocale in
            byLocale.sorted { $0.key < $1.key }.map { locale, content in
                Components.Schemas.Template(
                    channel: mapped(channel), locale: locale, subject: content.subject,
                    body: content.body, html: content.html)
            }
        }
        self.init(
            id: t.id.lowercased, key: t.key, category: t.categoryKey, name: t.name, description: t.description,
            defaultSeverity: mapped(t.defaultSeverity), defaultPriority: mapped(t.defaultPriority),
            defaultChannels: t.defaultChannels.map { mapped($0) }, templates: templates,
            createdAt: t.createdAt, updatedAt: t.updatedAt)
    }
}

/// Re-reads a value of one Codable shape as another with the same JSON (API schema ↔ core type).
func convert<T: Decodable>(_ value: some Encodable, to type: T.Type = T.self) throws -> T {
    try JSONDecoder().decode(T.self, from: try JSONEncoder().encode(value))
}

/// A stored value the API has no word for (an in-app channel where the spec lists only outbox
/// channels). It is this server's fault, never the client's: the request fails with a logged
/// 500 and the process goes on.
struct UnmappableValue: Error, CustomStringConvertible {
    var type: String
    var value: String
    var description: String { "no \(type) case for the stored value \"\(value)\"" }
}

// Store vocabulary ↔ the spec's enums, one exhaustive switch each way: a word added on either
// side does not compile until it is mapped here. The spec spells some vocabularies in more than
// one generated enum; a protocol of their words lets one switch serve them all.

func mapped(_ channel: NotificationChannel) -> Components.Schemas.ChannelName {
    switch channel {
    case .inApp: .inApp
    case .email: .email
    case .webhook: .webhook
    case .chat: .chat
    }
}

/// An outbox row's channel: never in-app.
func mapped(_ channel: NotificationChannel) throws -> Components.Schemas.Delivery.ChannelPayload {
    switch channel {
    case .email: .email
    case .webhook: .webhook
    case .chat: .chat
    case .inApp: throw UnmappableValue(type: "Delivery.ChannelPayload", value: channel.rawValue)
    }
}

/// An endpoint's channel: webhook or chat.
func mapped(_ channel: NotificationChannel) throws -> Components.Schemas.Endpoint.ChannelPayload {
    switch channel {
    case .webhook: .webhook
    case .chat: .chat
    case .inApp, .email: throw UnmappableValue(type: "Endpoint.ChannelPayload", value: channel.rawValue)
    }
}

/// A digest's cadence: DAILY or WEEKLY (the tables refuse any other).
func mapped(_ frequency: Frequency) throws -> Components.Schemas.DigestFrequency {
    switch frequency {
    case .daily: .daily
    case .weekly: .weekly
    case .immediate, .none: throw UnmappableValue(type: "DigestFrequency", value: frequency.rawValue)
    }
}

func mapped(_ severity: Severity) -> Components.Schemas.SeverityName {
    switch severity {
    case .info: .info
    case .warning: .warning
    case .critical: .critical
    }
}

func mapped(_ priority: Priority) -> Components.Schemas.PriorityName {
    switch priority {
    case .low: .low
    case .normal: .normal
    case .high: .high
    case .critical: .critical
    }
}

func mapped(_ frequency: Frequency) -> Components.Schemas.FrequencyName {
    switch frequency {
    case .immediate: .immediate
    case .daily: .daily
    case .weekly: .weekly
    case .none: .none
    }
}

/// The spec's words for where a preference came from (resolved preferences and explain).
protocol PreferenceSourceWords {
    static var user: Self { get }
    static var organisationDefault: Self { get }
    static var typeDefault: Self { get }
    static var criticalOverride: Self { get }
}
extension Components.Schemas.ResolvedPreference.SourcePayload: PreferenceSourceWords {}
extension Components.Schemas.ExplainedChannel.SourcePayload: PreferenceSourceWords {}

func mapped<Word: PreferenceSourceWords>(_ source: PreferenceSource) -> Word {
    switch source {
    case .user: .user
    case .organisationDefault: .organisationDefault
    case .typeDefault: .typeDefault
    case .criticalOverride: .criticalOverride
    }
}

/// The spec's words for a delivery's status (the outbox and explain).
protocol DeliveryStatusWords {
    static var pending: Self { get }
    static var sending: Self { get }
    static var sent: Self { get }
    static var failed: Self { get }
    static var dead: Self { get }
    static var cancelled: Self { get }
}
extension Components.Schemas.DeliveryStatus: DeliveryStatusWords {}
extension Components.Schemas.ExplainedChannel.DeliveriesPayloadPayload.StatusPayload: DeliveryStatusWords {}

func mapped<Word: DeliveryStatusWords>(_ status: DeliveryStatus) -> Word {
    switch status {
    case .pending: .pending
    case .sending: .sending
    case .sent: .sent
    case .failed: .failed
    case .dead: .dead
    case .cancelled: .cancelled
    }
}

/// The spec's words for who acted (the audit log and an event's sender).
protocol ActorKindWords {
    static var user: Self { get }
    static var apiKey: Self { get }
    static var system: Self { get }
}
extension Components.Schemas.AuditEntry.ActorTypePayload: ActorKindWords {}
extension Components.Schemas.EventSender._TypePayload: ActorKindWords {}

func mapped<Word: ActorKindWords>(_ kind: ActorKind) -> Word {
    switch kind {
    case .user: .user
    case .apiKey: .apiKey
    case .system: .system
    }
}

func mapped(_ outcome: ChannelOutcome) -> Components.Schemas.ExplainedChannel.OutcomePayload {
    switch outcome {
    case .inApp: .inApp
    case .immediate: .immediate
    case .digest: .digest
    case .skipped: .skipped
    }
}

func mapped(_ status: FeedItemStatus) -> Components.Schemas.ExplainedChannel.NotificationStatusPayload {
    switch status {
    case .unread: .unread
    case .read: .read
    case .archived: .archived
    case .deleted: .deleted
    case .withdrawn: .withdrawn
    case .scheduled: .scheduled
    case .expired: .expired
    }
}

func mapped(_ status: DigestItemStatus) -> Components.Schemas.ExplainedChannel.DigestStatusPayload {
    switch status {
    case .pending: .pending
    case .sent: .sent
    case .cancelled: .cancelled
    case .dropped: .dropped
    }
}

func mapped(_ status: EventStatus) -> Components.Schemas.Event.StatusPayload {
    switch status {
    case .accepted: .accepted
    case .cancelled: .cancelled
    }
}

func mapped(_ state: FanoutState) -> Components.Schemas.Fanout.StatePayload {
    switch state {
    case .expanding: .expanding
    case .done: .done
    case .cancelled: .cancelled
    case .failed: .failed
    }
}

func mapped(_ format: EndpointFormat) -> Components.Schemas.Endpoint.FormatPayload {
    switch format {
    case .standard: .standard
    case .slack: .slack
    case .mattermost: .mattermost
    }
}

func mapped(_ outcome: AttemptOutcome) -> Components.Schemas.DeliveryAttempt.OutcomePayload {
    switch outcome {
    case .sent: .sent
    case .failed: .failed
    case .dead: .dead
    case .cancelled: .cancelled
    case .fenced: .fenced
    case .expired: .expired
    }
}

func mapped(_ state: EventState) -> Components.Schemas.Event.StatePayload {
    switch state {
    case .scheduled: .scheduled
    case .delivered: .delivered
    case .cancelled: .cancelled
    }
}

func mapped(_ status: DigestRunStatus) -> Components.Schemas.DigestRunStatus {
    switch status {
    case .pending: .pending
    case .sending: .sending
    case .failed: .failed
    case .sent: .sent
    case .dead: .dead
    case .empty: .empty
    }
}

func mapped(_ drop: DigestDrop) -> Components.Schemas.ExplainedChannel.DigestDroppedReasonPayload {
    switch drop {
    case .eventCancelled: .eventCancelled
    case .eventExpired: .eventExpired
    case .userInactive: .userInactive
    case .channelDisabled: .channelDisabled
    case .frequencyNone: .frequencyNone
    case .conditionNotMet: .conditionNotMet
    }
}

func mapped(_ job: SystemJob) -> Components.Schemas.Job.NamePayload {
    switch job {
    case .retention: .retention
    case .purgeExpired: .purgeExpired
    case .inactivity: .inactivity
    }
}

func mapped(_ status: JobStatus) -> Components.Schemas.Job.StatusPayload {
    switch status {
    case .idle: .idle
    case .running: .running
    }
}

func mapped(_ trigger: JobTrigger) -> Components.Schemas.JobRun.TriggerPayload {
    switch trigger {
    case .schedule: .schedule
    case .manual: .manual
    }
}

func mapped(_ status: JobRunStatus) -> Components.Schemas.JobRun.StatusPayload {
    switch status {
    case .running: .running
    case .succeeded: .succeeded
    case .failed: .failed
    case .abandoned: .abandoned
    }
}

// The request's words into the store's vocabulary.

func mapped(_ channel: Components.Schemas.ChannelName, to: NotificationChannel.Type = NotificationChannel.self) -> NotificationChannel {
    switch channel {
    case .inApp: .inApp
    case .email: .email
    case .webhook: .webhook
    case .chat: .chat
    }
}

func mapped(_ channel: Components.Parameters.ChannelPath, to: NotificationChannel.Type = NotificationChannel.self) -> NotificationChannel {
    switch channel {
    case .inApp: .inApp
    case .email: .email
    case .webhook: .webhook
    case .chat: .chat
    }
}

func mapped(
    _ channel: Operations.ListDeliveries.Input.Query.ChannelPayload, to: NotificationChannel.Type = NotificationChannel.self
) -> NotificationChannel {
    switch channel {
    case .email: .email
    case .webhook: .webhook
    case .chat: .chat
    }
}

func mapped(
    _ channel: Components.Schemas.DeliveryRetryMany.ChannelPayload, to: NotificationChannel.Type = NotificationChannel.self
) -> NotificationChannel {
    switch channel {
    case .email: .email
    case .webhook: .webhook
    case .chat: .chat
    }
}

func mapped(_ status: Components.Schemas.DeliveryRetryMany.StatusPayload, to: DeliveryStatus.Type = DeliveryStatus.self) -> DeliveryStatus {
    switch status {
    case .failed: .failed
    case .dead: .dead
    case .cancelled: .cancelled
    }
}

func mapped(
    _ channel: Components.Schemas.EndpointCreate.ChannelPayload, to: NotificationChannel.Type = NotificationChannel.self
)
    -> NotificationChannel
{
    switch channel {
    case .webhook: .webhook
    case .chat: .chat
    }
}

func mapped(_ format: Components.Schemas.EndpointCreate.FormatPayload, to: EndpointFormat.Type = EndpointFormat.self) -> EndpointFormat {
    switch format {
    case .standard: .standard
    case .slack: .slack
    case .mattermost: .mattermost
    }
}

func mapped(_ severity: Components.Schemas.SeverityName, to: Severity.Type = Severity.self) -> Severity {
    switch severity {
    case .info: .info
    case .warning: .warning
    case .critical: .critical
    }
}

func mapped(_ priority: Components.Schemas.PriorityName, to: Priority.Type = Priority.self) -> Priority {
    switch priority {
    case .low: .low
    case .normal: .normal
    case .high: .high
    case .critical: .critical
    }
}

func mapped(_ frequency: Components.Schemas.FrequencyName, to: Frequency.Type = Frequency.self) -> Frequency {
    switch frequency {
    case .immediate: .immediate
    case .daily: .daily
    case .weekly: .weekly
    case .none: .none
    }
}

func mapped(_ status: Components.Schemas.DeliveryStatus, to: DeliveryStatus.Type = DeliveryStatus.self) -> DeliveryStatus {
    switch status {
    case .pending: .pending
    case .sending: .sending
    case .sent: .sent
    case .failed: .failed
    case .dead: .dead
    case .cancelled: .cancelled
    }
}

func mapped(
    _ severity: Operations.ListMyNotifications.Input.Query.SeverityPayload, to: Severity.Type = Severity.self
) -> Severity {
    switch severity {
    case .info: .info
    case .warning: .warning
    case .critical: .critical
    }
}

func mapped(
    _ priority: Operations.ListMyNotifications.Input.Query.PriorityPayload, to: Priority.Type = Priority.self
) -> Priority {
    switch priority {
    case .low: .low
    case .normal: .normal
    case .high: .high
    case .critical: .critical
    }
}

func mapped(_ state: Operations.ListEvents.Input.Query.StatePayload, to: EventState.Type = EventState.self) -> EventState {
    switch state {
    case .scheduled: .scheduled
    case .delivered: .delivered
    case .cancelled: .cancelled
    }
}
