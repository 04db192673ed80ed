import Foundation
import HeraldCore
import PostgresNIO

/// What following a tracked link found.
public struct Click: Sendable, Equatable {
    /// Where the notification leads; nil when its event named no URL.
    public var url: String?
}

/// What a tracked link was sent in: a delivery, or one item of a digest.
public enum TrackedLink: Sendable, Equatable {
    case delivery(UUID)
    case digestItem(UUID)
}

extension TenantTransaction {
    /// Records a click on a tracked link (which must be `userID`'s): a delivery's, or an item's
    /// in a digest. Refreshes the user's engagement date and returns the one target the
    /// notification carries. Not `counted` (a HEAD from a link scanner): the target only.
    public func recordClick(on link: TrackedLink, userID: UUID, at now: Date = Date(), counted: Bool = true) async throws -> Click {
        let (deliveryID, digestItemID): (UUID?, UUID?) =
            switch link {
            case .delivery(let id): (id, nil)
            case .digestItem(let id): (nil, id)
            }
        guard
            let row = try await query(
                """
                SELECT e.url FROM events e
                WHERE e.organisation_id = \(organisationID) AND e.id = (
                    SELECT d.event_id FROM deliveries d
                    WHERE d.organisation_id = \(organisationID) AND d.id = \(deliveryID) AND d.user_id = \(userID)
                    UNION ALL
                    SELECT i.event_id FROM digest_items i
                    WHERE i.organisation_id = \(organisationID) AND i.id = \(digestItemID) AND i.user_id = \(userID))
                """
            ).first
        else { throw StoreError.notFound("link") }
        guard counted else { return Click(url: try row.decode(String?.self)) }
        try await query(
            """
            INSERT INTO link_clicks (organisation_id, delivery_id, digest_item_id, user_id)
            VALUES (\(organisationID), \(deliveryID), \(digestItemID), \(userID))
            """)
        try await recordEngagement(of: userID, at: now)
        return Click(url: try row.decode(String?.self))
    }

    /// Switches one preference cell (category × channel) of a user off, keeping any other cell
    /// as it is. Returns the cell as it was (nil when the user had no setting of their own).
    public func unsubscribe(userID: UUID, categoryID: UUID, channel: NotificationChannel) async throws -> PreferenceSetting? {
        _ = try await category(categoryID)
        let before = try await preferences(ofUser: userID).first { $0.categoryID == categoryID && $0.channel == channel }?.setting
        try await query(
            """
            INSERT INTO preferences (organisation_id, user_id, category_id, channel, enabled, frequency)
            VALUES (\(organisationID), \(userID), \(categoryID), \(channel), false, \(Frequency.none))
            ON CONFLICT (organisation_id, user_id, category_id, channel) DO UPDATE SET enabled = false, updated_at = now()
            """)
        return before
    }

    /// How many times a delivery's tracked link was followed.
    public func clickCount(deliveryID: UUID) async throws -> Int {
        try await query("SELECT count(*)::int FROM link_clicks WHERE organisation_id = \(organisationID) AND delivery_id = \(deliveryID)")[
            0
        ].decode(Int.self)
    }
}
