import HeraldStore
import Logging
import Foundation
import HeraldCore

extension HeraldService {
    func listAuditEntries(_ input: Operations.ListAuditEntries.Input) async throws -> Operations.ListAuditEntries.Output {
        let limit = try validated { () throws(ValidationError) in try PageSize.clamp(input.query.limit) }
        let cursor = try input.query.cursor.map { c in try validated { () throws(ValidationError) in try PageCursor(encoded: c) } }
        let page = try await tenant("audit entry") { tx, _ in
            try await tx.auditEntries(action: input.query.action, targetID: input.query.targetId?.lowercased(), limit: limit, after: cursor)
        }
        return .ok(.init(body: .json(.init(items: try page.items.map(Components.Schemas.AuditEntry.init), nextCursor: page.next?.encoded))))
    }
}
