import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    func listAuditEntries(_ input: Operations.ListAuditEntries.Input) async throws -> Operations.ListAuditEntries.Output {
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let page = try await tenant { tx, _ in
            try await tx.auditEntries(
                action: input.query.action,
                targetID: try input.query.targetId.map { v in try Validate.uuid(v, field: "target_id").lowercased }, limit: limit,
                after: cursor)
        }
        return .ok(.init(body: .json(.init(items: try page.items.map(Components.Schemas.AuditEntry.init), nextCursor: page.next?.encoded))))
    }
}
