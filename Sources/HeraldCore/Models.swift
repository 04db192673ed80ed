import Foundation

/// Who acted: a user, an API key, or Herald itself (CLI, maintenance).
public enum Actor: Sendable, Equatable {
    case user(UUID)
    case apiKey(UUID)
    case system

    public var kind: ActorKind {
        switch self {
        case .user: .user
        case .apiKey: .apiKey
        case .system: .system
        }
    }

    public var id: UUID? {
        switch self {
        case .user(let id), .apiKey(let id): id
        case .system: nil
        }
    }
}

/// What kind of actor acted, as `events.actor_type` and `audit_log.actor_type` store it.
public enum ActorKind: String, CaseIterable, Sendable, Codable {
    case user
    case apiKey = "api_key"
    case system
}

/// One page of a keyset-paginated list.
public struct Page<Item: Sendable>: Sendable {
    public var items: [Item]
    public var next: PageCursor?
    public init(items: [Item], next: PageCursor?) {
        self.items = items
        self.next = next
    }
}

extension Actor {
    /// The acting user's id, when a user acts.
    public var userID: UUID? {
        if case .user(let id) = self { return id }
        return nil
    }
}
