import Foundation
import HeraldCore
import PostgresNIO

/// What following a tracked link found.
public struct Click: Sendable, Equatable {
    /// Where the notification leads; nil when its event named no URL.
    public var url: String?
}

extension TenantTransaction {
    /// Records a click on the tracked link of `deliveryID` (which must be `userID`'s), refreshes
    /// the user's engagement date, and returns the one target the notification carries.
    public func recordClick(deliveryID: UUID, userID: UUID) async throws -> Click {
        guard
            let row = try await query(
                """
                SELECT e.url FROM deliveries d JOIN events e ON e.organisation_id = d.organisation_id AND e.id = d.event_id
                WHERE d.organisation_id = \(organisationID) AND d.id = \(deliveryID) AND d.user_id = \(userID)
                """
            ).first
        else { throw StoreError.notFound("link") }
        try await query(
            "INSERT INTO link_clicks (organisation_id, delivery_id, user_id) VALUES (\(organisationID), \(deliveryID), \(userID))")
        try await query("UPDATE users SET last_engaged_at = now() WHERE organisation_id = \(organisationID) AND id = \(userID)")
        return Click(url: try row.decode(String?.self))
    }

    /// Records a click on the tracked link of an item in a digest, as `recordClick(deliveryID:)`.
    public func recordClick(digestItemID: UUID, userID: UUID) async throws -> Click {
        guard
            let row = try await query(
                """
                SELECT e.url FROM digest_items i JOIN events e ON e.organisation_id = i.organisation_id AND e.id = i.event_id
                WHERE i.organisation_id = \(organisationID) AND i.id = \(digestItemID) AND i.user_id = \(userID)
                """
            ).first
        else { throw StoreError.notFound("link") }
        try await query(
            "INSERT INTO link_clicks (organisation_id, digest_item_id, user_id) VALUES (\(organisationID), \(digestItemID), \(userID))")
        try await query("UPDATE users SET last_engaged_at = now() WHERE organisation_id = \(organisationID) AND id = \(userID)")
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
