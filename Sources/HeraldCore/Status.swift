/// Where a delivery in the outbox stands. Stable strings: the `deliveries.status` column and
/// the API use them.
public enum DeliveryStatus: String, CaseIterable, Sendable, Codable {
    case pending = "PENDING"
    case sending = "SENDING"
    case sent = "SENT"
    case failed = "FAILED"
    case dead = "DEAD"
    case cancelled = "CANCELLED"
}

/// Where an event stands: accepted by notify, or cancelled before it was delivered.
public enum EventStatus: String, CaseIterable, Sendable, Codable {
    case accepted = "ACCEPTED"
    case cancelled = "CANCELLED"
}

/// How one attempt of a delivery ended (`delivery_attempts.outcome`): the three ends of a send,
/// a delivery its event's cancel stopped while a worker held it, a late completion the fence
/// refused, or a lease that ran out and was rescued.
public enum AttemptOutcome: String, CaseIterable, Sendable, Codable {
    case sent = "SENT"
    case failed = "FAILED"
    case dead = "DEAD"
    case cancelled = "CANCELLED"
    case fenced = "FENCED"
    case expired = "EXPIRED"
}

/// Where a digest item stands: waiting for its run, sent in one, cancelled with its event, or
/// dropped from its run at send time because it no longer qualified.
public enum DigestItemStatus: String, CaseIterable, Sendable, Codable {
    case pending = "PENDING"
    case sent = "SENT"
    case cancelled = "CANCELLED"
    case dropped = "DROPPED"
}

/// Where an in-app notification stands for its recipient; `scheduled` until it is shown (its
/// event's `deliver_at`), `expired` past its `expires_at` (hidden, or purged since), `deleted`
/// once the user deleted it, `withdrawn` when its event was cancelled before it was shown.
public enum FeedItemStatus: String, CaseIterable, Sendable, Codable {
    case unread = "UNREAD"
    case read = "READ"
    case archived = "ARCHIVED"
    case deleted = "DELETED"
    case withdrawn = "WITHDRAWN"
    case scheduled = "SCHEDULED"
    case expired = "EXPIRED"
}

/// How a webhook or chat endpoint's messages are shaped: Standard Webhooks for a webhook, a
/// chat service's markup for chat.
public enum EndpointFormat: String, CaseIterable, Sendable, Codable {
    case standard
    case slack
    case mattermost
}
