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
